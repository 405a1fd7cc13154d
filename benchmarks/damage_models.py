"""Damaged model folders through the CLI, one process per kind of damage: how many end in a traceback?

    python benchmarks/damage_models.py [--workers 2] [--only KIND ...] [--json damage.json]

Builds one lr and one finetune model (a tiny random-weight backbone on generated images), then
runs ``python -m xferkit predict`` (or ``evaluate``) on a damaged copy for each entry of the
catalogue in ``tests/test_damaged_models.py`` (the test runs the same list in-process), offline.
Prints a Markdown table "kind | exit code | traceback?" and the totals; the goal is exit code 2
everywhere, no traceback and no code run from a folder.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_damaged_models import DAMAGES, Damage, build_models, cli_args, damaged_copy, marker  # noqa: E402


def run_case(index: int, damage: Damage, built: dict, root: Path, env: dict) -> dict:
    """Load a freshly damaged copy with the CLI in its own process: exit code, traceback, code run."""
    folder = damaged_copy(damage, built, Path(tempfile.mkdtemp(prefix=f"case{index}-", dir=root)))
    done = subprocess.run([sys.executable, "-m", "xferkit", *map(str, cli_args(damage, folder, built))],
                          capture_output=True, text=True, env=env, timeout=600)
    return {"kind": damage.kind, "exit_code": done.returncode,
            "traceback": "Traceback" in done.stdout + done.stderr, "code_ran": marker(folder).exists()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="Cases run at once.")
    parser.add_argument("--only", nargs="+", metavar="KIND", help="Run only these kinds of damage.")
    parser.add_argument("--json", type=Path, help="Also write the rows and totals to this file.")
    args = parser.parse_args(argv)
    damages = [d for d in DAMAGES if not args.only or d.kind in args.only]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["XFERKIT_CACHE"] = str(root / "cache")
        built = build_models(root)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf"),
               "TORCH_HOME": str(root / "torch")}
        with ThreadPoolExecutor(args.workers) as pool:
            rows = list(pool.map(lambda case: run_case(*case, built, root, env), enumerate(damages)))
    totals = {"kinds": len(rows), "exit_code_2": sum(r["exit_code"] == 2 for r in rows),
              "tracebacks": sum(r["traceback"] for r in rows), "code_ran": sum(r["code_ran"] for r in rows)}
    print("| kind | exit code | traceback? |\n| --- | ---: | --- |")
    for row in rows:
        print(f"| {row['kind']} | {row['exit_code']} | {'yes' if row['traceback'] else 'no'}"
              f"{' (code ran!)' if row['code_ran'] else ''} |")
    print(f"\n{totals['kinds']} kinds of damage tried: {totals['exit_code_2']} exit with code 2, "
          f"{totals['tracebacks']} tracebacks, {totals['code_ran']} ran code from the folder.")
    result = {"rows": rows, "totals": totals}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
