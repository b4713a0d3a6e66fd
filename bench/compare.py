#!/usr/bin/env python3
"""A/B comparison: one benchmark run alternately against several checkouts, in the same hour.

The CPU this machine gets drifts (a factor of 2 within an hour was seen), so figures of a change
measured at another time than the baseline's are not comparable. This runs `script --runs 1`
against each root in turn, `--rounds` times (A B A B ...), and prints per figure the median per
root and its ratio to the first root.

    .venv/bin/python bench/compare.py --roots base=.,fix=/tmp/scratch --rounds 3 -- idle_gap.py --variant blank
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import _common as c  # noqa: E402


def main() -> int:
    argv = sys.argv[1:]
    if "--" not in argv:
        raise SystemExit("usage: compare.py --roots NAME=PATH,... [--rounds N] -- SCRIPT.py [script options]")
    cut = argv.index("--")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--roots", required=True, help="NAME=PATH,NAME=PATH (the first is the baseline)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv[:cut])
    script, *script_args = argv[cut + 1:]
    roots = [tuple(item.split("=", 1)) for item in args.roots.split(",")]
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-compare-"))
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, dict[str, list[float]]] = {}
    calib: dict[str, list[float]] = {name: [] for name, _ in roots}
    for rnd in range(args.rounds):
        for name, root in roots:
            result = out / f"{name}-{rnd}.json"
            with open(out / f"{name}-{rnd}.txt", "w") as log:
                code = subprocess.call([sys.executable, str(BENCH / script), "--runs", "1", "--root", root,
                                        "--json", str(result), *script_args], stdout=log, stderr=subprocess.STDOUT)
            if code != 0 or not result.exists():
                print(f"{name} round {rnd + 1}: failed (exit {code}), see {out / f'{name}-{rnd}.txt'}", file=sys.stderr)
                continue
            data = json.loads(result.read_text())
            calib[name] += data.get("calibration_ms", [])
            for row in data["rows"]:
                if row.get("number") is not None:
                    figures.setdefault(row["figure"], {}).setdefault(name, []).append(row["number"])
            print(f"round {rnd + 1}/{args.rounds} {name}: done", file=sys.stderr, flush=True)
    base = roots[0][0]
    print(f"\n== {script} {' '.join(script_args)}: {args.rounds} alternating rounds ==")
    print(f"roots: {', '.join(f'{n}={r}' for n, r in roots)}")
    for figure, per_root in figures.items():
        ref = c.median(per_root.get(base, [float('nan')]))
        cells = []
        for name, _ in roots:
            vals = per_root.get(name, [])
            if not vals:
                cells.append(f"{name}: -")
                continue
            m = c.median(vals)
            cells.append(f"{name}: {m:.3g} ({', '.join(f'{v:.3g}' for v in vals)})"
                         + ("" if name == base or not ref else f" = {m / ref:.2f} x {base}"))
        print(f"  {figure}: " + "; ".join(cells))
    print("  machine speed (fixed Python workload, ms): " + "; ".join(
        f"{n}: {c.median(v):.1f}" for n, v in calib.items() if v))
    print(f"(outputs in {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
