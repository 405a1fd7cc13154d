"""Write a small natural-photo data set and a folder of images of another kind, from files that ship offline.

``OUT/faces/{train,test}/{face,non_face}``: the 200 Labeled Faces in the Wild crops (25×25 grey, 100
faces and 100 non-faces cut from the same news photos) that scikit-image ships as ``data.lfw_subset()``,
split 70/30 per class with a fixed seed. ``OUT/textures``: 60 crops of the brick, grass and gravel
photographs scikit-image also ships, for out-of-distribution checks (``evaluate --ood``).
Needs ``pip install scikit-image`` (only this script does).

    python benchmarks/natural_data.py runs/natural
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

TRAIN_PER_CLASS, SEED, TEXTURE_CROPS, CROP = 70, 0, 20, 96


def write_faces(out: Path) -> None:
    from skimage import data, img_as_ubyte

    images = img_as_ubyte(data.lfw_subset())
    labels = np.repeat(["face", "non_face"], 100)  # the first 100 are faces (scikit-image docs)
    rng = np.random.default_rng(SEED)
    for name in ("face", "non_face"):
        chosen = rng.permutation(np.flatnonzero(labels == name))
        for split, index in (("train", chosen[:TRAIN_PER_CLASS]), ("test", chosen[TRAIN_PER_CLASS:])):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in index:
                Image.fromarray(images[i], "L").save(folder / f"{i:03d}.png")


def write_textures(out: Path) -> None:
    from skimage import data

    rng = np.random.default_rng(SEED)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("brick", "grass", "gravel"):
        photo = getattr(data, name)()
        for k in range(TEXTURE_CROPS):
            top, left = rng.integers(0, np.array(photo.shape[:2]) - CROP)
            Image.fromarray(photo[top:top + CROP, left:left + CROP]).save(out / f"{name}_{k:02d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    write_faces(args.out / "faces")
    write_textures(args.out / "textures")
    print(f"wrote {args.out / 'faces'} (train/test) and {args.out / 'textures'}")


if __name__ == "__main__":
    main()
