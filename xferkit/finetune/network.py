"""The network a pixel trainer trains: a backbone body and a linear classifier, frozen where it must not."""

from __future__ import annotations

from collections.abc import Collection

import torch
from timm.models import group_parameters
from torch import nn

from xferkit.backbones.layers import TimmStage, TracedLayer


class ImageClassifier(nn.Module):
    """``body`` (pooled features) -> dropout -> linear; *frozen* body parameters never train.

    Frozen parameters keep ``requires_grad=False``, and a module whose parameters are all frozen
    stays in eval mode while the rest trains, so its batch-norm statistics do not move either.
    """

    def __init__(self, body: nn.Module, num_classes: int, dropout: float = 0.0, frozen: Collection[str] = ()):
        super().__init__()
        self.body, self.dropout = body, nn.Dropout(dropout)
        self.classifier = nn.Linear(body.num_features, num_classes)
        frozen = set(frozen)
        for name, param in body.named_parameters():
            param.requires_grad_(name not in frozen)
        self.frozen_modules = [name for name, module in self.named_modules() if _all_frozen(module)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.body(x)))

    def train(self, mode: bool = True) -> ImageClassifier:
        super().train(mode)
        for name in self.frozen_modules:
            self.get_submodule(name).eval()
        return self

    def learned_state(self) -> dict[str, torch.Tensor]:
        """The tensors training can change: trainable parameters, and the buffers of modules that train."""
        params, frozen = dict(self.named_parameters()), set(self.frozen_modules)

        def learned(key: str) -> bool:
            if key in params:
                return params[key].requires_grad
            parts = key.split(".")
            return not any(".".join(parts[:i]) in frozen for i in range(1, len(parts)))
        return {key: value for key, value in self.state_dict().items() if learned(key)}

    def to_device(self, device: torch.device) -> ImageClassifier:
        """Move to *device*, channels-last like its inputs (cuDNN with bf16 and oneDNN prefer it)."""
        return self.to(device).to(memory_format=torch.channels_last)


def _all_frozen(module: nn.Module) -> bool:
    trainable = [p.requires_grad for p in module.parameters()]
    return bool(trainable) and not any(trainable)


def parameter_blocks(body: nn.Module) -> list[list[str]]:
    """The body's blocks in forward order, as lists of parameter names: the unit ``unfreeze`` counts.

    timm models: timm's coarse ``group_matcher`` (the stem, then each stage; a final norm joins the
    last). Others (torchvision): one block per top-level child with parameters, ``features`` child
    by child; parameters of the model itself (a class token) join the first block.
    """
    inner = body.model if isinstance(body, (TimmStage, TracedLayer)) else body
    prefix = "model." if inner is not body else ""
    if hasattr(inner, "group_matcher"):
        blocks = list(group_parameters(inner, inner.group_matcher(coarse=True)).values())
    else:
        blocks = _child_blocks(inner)
    return [[prefix + name for name in block] for block in blocks]


def _child_blocks(model: nn.Module) -> list[list[str]]:
    units = []
    for name, child in model.named_children():
        units += [f"{name}.{sub}" for sub, _ in child.named_children()] if name == "features" else [name]
    blocks = [[f"{unit}.{name}" for name, _ in model.get_submodule(unit).named_parameters()]
              for unit in units]
    blocks = [block for block in blocks if block]
    covered = {name for block in blocks for name in block}
    own = [name for name, _ in model.named_parameters() if name not in covered]
    if own:
        blocks[:1] = [own + (blocks[0] if blocks else [])]
    return blocks


def he_init(network: nn.Module) -> None:
    """Kaiming-normal (fan-in, ReLU gain) conv and linear weights, zero biases, norms reset to 1, 0."""
    for module in network.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
            module.reset_parameters()


class RandomFreeze:
    """xfer's random freeze: a fixed random fraction of each trained tensor never changes.

    The frozen entries' gradients are masked to zero; since AdamW's decoupled weight decay
    bypasses gradients, their values are also written back after each step.
    """

    def __init__(self, params: list[nn.Parameter], fraction: float, seed: int):
        generator = torch.Generator().manual_seed(seed)
        masks = [(torch.rand(p.shape, generator=generator) < fraction).to(p.device) for p in params]
        self.frozen = [(p, mask, p.detach()[mask].clone()) for p, mask in zip(params, masks, strict=True)]

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        for p, mask, _ in self.frozen:
            if p.grad is not None:
                p.grad.masked_fill_(mask, 0.0)
        optimizer.step()
        with torch.no_grad():
            for p, mask, values in self.frozen:
                p[mask] = values
