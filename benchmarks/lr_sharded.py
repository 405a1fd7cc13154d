"""The LR head fitted data-parallel under torchrun: each rank streams its own rows of a memory-mapped matrix.

    torchrun --nproc-per-node 2 benchmarks/lr_sharded.py [--rows 500000] [--dim 512] [--classes 10]
                                                         [--chunk-rows 32768] [--choose-C]

Rank 0 writes :mod:`lr_scale`'s synthetic features to one ``.npy`` file; every rank then maps it
and fits ``LogisticHead.fit_streamed(sharded=True)`` on its contiguous share of the rows (sums
all-reduced over the ranks), with ``C=1`` or, with ``--choose-C``, ``C=None`` (the C grid fitted on a
held-out split of every rank's rows at once, then the best C refitted). Rank 0 prints each rank's
peak RSS against the size of its share and of the whole matrix, the fit's time and iterations, and
whether every rank ended with the same weights.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from lr_scale import peak_rss_mb, write_features

from xferkit.core import distributed
from xferkit.heads import LogisticHead


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--chunk-rows", type=int, default=32768)
    parser.add_argument("--max-iter", type=int, default=1000)
    parser.add_argument("--choose-C", action="store_true", help="C=None: choose C on held-out rows")
    parser.add_argument("--data", type=Path, default=Path("/tmp/xferkit-lr-sharded.npy"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    distributed.init()
    y = write_features(args.data, args.rows, args.dim, args.classes) if distributed.is_main() else None
    y = distributed.broadcast_object(y)  # also: the file is complete before any rank maps it
    part = distributed.shard(args.rows)
    X = np.load(args.data, mmap_mode="r")[part.start:part.stop]
    before = peak_rss_mb()
    started = time.perf_counter()
    head = LogisticHead(None if args.choose_C else 1.0, max_iter=args.max_iter, random_state=0).fit_streamed(
        X, y[part.start:part.stop], chunk_rows=args.chunk_rows, sharded=True)
    seconds = time.perf_counter() - started
    mine = {"rank": distributed.rank(), "rows": len(part), "share_mb": round(X.nbytes / 2**20, 1),
            "peak_rss_mb_before_fit": round(before, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
            "fit_s": round(seconds, 1), "coef": head.coef_}
    ranks = distributed.all_gather_objects(mine)
    result = {"rows": args.rows, "dim": args.dim, "classes": args.classes, "chunk_rows": args.chunk_rows,
              "world_size": distributed.world_size(), "matrix_mb": round(args.rows * args.dim * 4 / 2**20, 1),
              "C": head.C_, "iterations": head.n_iter_,
              "same_weights_on_every_rank": all(np.array_equal(r["coef"], head.coef_) for r in ranks),
              "ranks": [{k: v for k, v in r.items() if k != "coef"} for r in ranks]}
    if distributed.is_main():
        for r in result["ranks"]:
            print(f"| rank {r['rank']} | {r['rows']}x{args.dim}: {r['share_mb']} of {result['matrix_mb']} MB "
                  f"| peak RSS {r['peak_rss_mb']} MB ({r['peak_rss_mb_before_fit']} before the fit) "
                  f"| fit {r['fit_s']} s | C={head.C_:g}, {head.n_iter_} iterations |")
        print(f"same weights on every rank: {result['same_weights_on_every_rank']}")
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        args.data.unlink()
    return result


if __name__ == "__main__":
    main()
