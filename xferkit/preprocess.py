"""How images become a backbone's input: resize, centre-crop and normalise, or augment for training.

The recipe (input size, interpolation, crop fraction, mean and std) comes from the backbone's
own config; the same recipe runs on PIL images in loader workers or on tensors on the device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import create_transform
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from xferkit.io.images import centre_box, load_rgb, read_jpeg, resized_size
from xferkit.io.jpeg_cpu import decode_scaled
from xferkit.io.jpeg_device import by_budget

#: Interpolations torchvision can run on tensors (PIL-only filters such as lanczos cannot).
TENSOR_INTERPOLATIONS = {"bilinear", "bicubic"}
#: Pixels resized at once on a device (in float, 4x the bytes): bounds GPU memory.
RESIZE_PIXELS = 2**25
#: Random-resized-crop area range for training: timm's default (0.08, 1) destroys small images
#: such as digits; 0.35 is the milder floor fastai uses for fine-tuning.
CROP_SCALE = (0.35, 1.0)
#: JPEGs longer than this many times their width (or wider than tall) are not resized whole as tensors:
#: a long strip would take gigabytes before the crop; PIL resizes only the pixels the crop keeps.
MAX_TENSOR_ASPECT = 4


@dataclass(frozen=True)
class Preprocess:
    """How images are resized, cropped and normalised for a backbone (from its own config)."""

    input_size: tuple[int, int]
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float

    @property
    def resize_size(self) -> int:
        """Shorter side before the centre crop, as timm and torchvision compute it."""
        return int(min(self.input_size) / self.crop_pct)

    def with_image_size(self, size: int) -> Preprocess:
        """Same preprocessing at another square input size (for small images on a CPU)."""
        return replace(self, input_size=(size, size))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Preprocess:
        return cls(input_size=tuple(data["input_size"]), interpolation=data["interpolation"],
                   mean=tuple(data["mean"]), std=tuple(data["std"]), crop_pct=data["crop_pct"])


def image_to_tensor(path, preprocess: Preprocess) -> torch.Tensor:
    """Decode, resize the shorter side, centre-crop: a uint8 (3, H, W) tensor, not yet normalised.

    A plain JPEG decodes with libjpeg-turbo (simplejpeg) and resizes in torch, uint8 and antialiased:
    the same pixels as PIL's path for about 0.7x its CPU time. Every other file, or a JPEG
    libjpeg-turbo rejects, takes PIL's path, with all of its checks.
    """
    jpeg = read_jpeg(path) if supports_tensor_resize(preprocess) else None
    if jpeg is not None and max(jpeg.size) <= MAX_TENSOR_ASPECT * min(jpeg.size):
        try:
            return resize_crop(decode_scaled(jpeg, preprocess.resize_size)[None], preprocess)[0]
        except ValueError:
            pass  # damaged inside: PIL decodes what it can, or names the damage
    return TF.pil_to_tensor(resized_centre(load_rgb(path, min_size=preprocess.resize_size), preprocess))


def resized_centre(img: Image.Image, preprocess: Preprocess) -> Image.Image:
    """torchvision's ``center_crop(resize(img, resize_size))``, resampling only the pixels the crop keeps.

    One PIL resize of the crop's source box gives the same pixels as resizing the whole image and
    cropping it, without ever holding the whole resized image: a 20000x1 strip would otherwise
    become 5 billion pixels long before the crop kept 224 of them.
    """
    size, (crop_h, crop_w) = preprocess.resize_size, preprocess.input_size
    new_w, new_h = resized_size(img.size, size)
    resample = TF.pil_modes_mapping[InterpolationMode(preprocess.interpolation)]
    if crop_h > new_h or crop_w > new_w:  # the crop pads: the plain two steps
        return TF.center_crop(img.resize((new_w, new_h), resample), [crop_h, crop_w])
    return img.resize((crop_w, crop_h), resample, box=centre_box(img.size, size, preprocess.input_size))


def resize_crop(images: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """uint8 ``(n, 3, h, w)``: shorter side to ``resize_size`` (antialiased), centre crop, as on the PIL path.

    On the CPU the result stays uint8 (torch's vectorised uint8 kernel, 4x faster than
    ``TF.resize``); on a GPU, which has no uint8 antialiased kernel, it is float.
    """
    h, w = images.shape[-2:]
    new_w, new_h = resized_size((w, h), preprocess.resize_size)
    x = images if images.device.type == "cpu" else images.float()
    x = F.interpolate(x, size=(new_h, new_w), mode=preprocess.interpolation, antialias=True)
    x = TF.center_crop(x, list(preprocess.input_size))
    return x if x.dtype == torch.uint8 else x.clamp_(0, 255)


def resize_decoded(decoded: list[tuple[int, torch.Tensor]], preprocess: Preprocess
                   ) -> tuple[list[int], torch.Tensor | None]:
    """Resize and crop decoded ``(index, image)`` pairs, same-size images together; (indices, batch)."""
    by_shape: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
    for i, image in decoded:
        by_shape.setdefault(tuple(image.shape), []).append((i, image))
    index, out = [], []
    for group in by_shape.values():
        for part in by_budget(group, lambda item: item[1][0].numel(), RESIZE_PIXELS):
            out.append(resize_crop(torch.stack([image for _, image in part]), preprocess))
            index += [i for i, _ in part]
    return index, torch.cat(out) if out else None


def supports_tensor_resize(preprocess: Preprocess) -> bool:
    """Whether the resize can run on tensors (on a device) rather than on PIL images."""
    return preprocess.interpolation in TENSOR_INTERPOLATIONS


class Normalizer:
    """uint8 batches to normalised float on the device (moving uint8 is 4x less traffic)."""

    def __init__(self, preprocess: Preprocess, device: torch.device):
        std = torch.tensor(preprocess.std, device=device).view(1, 3, 1, 1)
        mean = torch.tensor(preprocess.mean, device=device).view(1, 3, 1, 1)
        self.scale, self.shift = 1.0 / (255.0 * std), mean / std
        self.device = device

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True).float()
        return (x * self.scale - self.shift).contiguous(memory_format=torch.channels_last)


def train_transform(preprocess: Preprocess) -> Callable:
    """timm's training augmentation (random resized crop, flip, colour jitter) as uint8 tensors."""
    return create_transform((3, *preprocess.input_size), is_training=True, use_prefetcher=True,
                            interpolation=preprocess.interpolation, scale=CROP_SCALE)
