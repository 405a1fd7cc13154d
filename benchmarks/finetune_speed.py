"""Fine-tuning throughput: xferkit's training loop on JPEGs against the same steps on tensors in memory.

    python benchmarks/finetune_speed.py [--backbone resnet50] [--images N] [--epochs 2] [--device cuda]

Trains ``FinetuneClassifier`` (every block unfrozen, random weights: the same speed as pretrained
ones) on generated photo-like JPEGs (extract.py's) and reports images/s of its epochs after the
first (the first pays for the workers' start and cuDNN's autotuning), next to the ceiling: the
same network, optimiser and batch trained on random tensors already on the device. Their ratio
says how much the input pipeline (decode + augmentation in worker processes) holds training back.
The figure feeds the README's estimate of a fine-tuning run on N GPUs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from extract import MIXED_SIZES, SMALL_SIZES, make_images

from xferkit.core.devices import available_cores, resolve_device
from xferkit.finetune import FinetuneClassifier
from xferkit.finetune.loop import adamw_groups


def epoch_rates(clf: FinetuneClassifier, paths: list[Path], labels: np.ndarray) -> list[float]:
    """Images/s of each epoch of ``clf.fit`` (timed from the progress calls at its steps)."""
    stamps: list[tuple[int, float]] = []
    clf.fit(paths, labels, progress=lambda done, total, info: stamps.append((done, time.perf_counter())))
    steps = len(stamps) // clf.epochs
    batch = clf.history_["batch_size"]
    ends = [stamps[0][1]] + [stamps[e * steps - 1][1] for e in range(1, clf.epochs + 1)]
    # the first epoch's clock starts at its first step (the workers' start is left out but not cuDNN's)
    return [(steps - (e == 0)) * batch / (ends[e + 1] - ends[e]) for e in range(clf.epochs)]


def ceiling(clf: FinetuneClassifier, n_classes: int, batch: int, steps: int, device: torch.device) -> float:
    """Images/s of the same training steps on random tensors resident on *device*."""
    backbone = clf._create_backbone()
    network = clf._build_network(backbone, n_classes).to_device(device).train()
    optimizer = torch.optim.AdamW(adamw_groups(network, clf.lr, clf.weight_decay),
                                  fused=device.type in ("cpu", "cuda"))
    x = torch.randn(batch, 3, *backbone.preprocess.input_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, n_classes, (batch,), device=device)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn(network(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()  # the training loop reads every step's loss too

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - start)


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    root = args.data or Path("/tmp") / f"xferkit-bench-{args.sizes}"
    paths = make_images(root, args.images, MIXED_SIZES if args.sizes == "mixed" else SMALL_SIZES)
    labels = np.array([p.parent.name for p in paths])
    clf = FinetuneClassifier(args.backbone, pretrained=False, epochs=args.epochs, validation_fraction=0,
                             batch_size=args.batch_size, device=str(device), workers=args.workers,
                             image_size=args.image_size, random_state=0)
    rates = epoch_rates(clf, paths, labels)
    batch = clf.history_["batch_size"]
    steady = float(np.median(rates[1:] or rates))
    top = ceiling(clf, len(set(labels)), batch, args.ceiling_steps, device)
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return {"backbone": args.backbone, "device": str(device), "images": len(paths), "sizes": args.sizes,
            "batch_size": batch, "epochs": args.epochs, "machine": f"{available_cores()} cores{gpu}, "
            f"torch {torch.__version__}", "epoch_images_per_s": [round(r, 1) for r in rates],
            "training_images_per_s": round(steady, 1), "ceiling_images_per_s": round(top, 1),
            "training_over_ceiling": round(steady / top, 3)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--ceiling-steps", type=int, default=20)
    parser.add_argument("--image-size", type=int, default=None, help="input size (default: the backbone's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=("cpu", "cuda"))
    parser.add_argument("--sizes", choices=("mixed", "small"), default="small")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=Path("finetune-benchmark.json"))
    args = parser.parse_args(argv)
    result = run(args)
    print(f"\n{result['backbone']} fine-tuning on {result['device']} ({result['machine']}), "
          f"{result['images']} JPEGs ({result['sizes']}), global batch {result['batch_size']}\n")
    print("| path | images/s |\n| --- | ---: |")
    print(f"| xferkit finetune, epochs after the first (each: {result['epoch_images_per_s']}) | "
          f"{result['training_images_per_s']} |")
    print(f"| the same steps on tensors already on the device | {result['ceiling_images_per_s']} |")
    print(f"\nxferkit / ceiling = {result['training_over_ceiling']:.2f}")
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
