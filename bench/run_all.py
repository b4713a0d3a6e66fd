#!/usr/bin/env python3
"""Run every benchmark in turn and print one Markdown table (goal beside figure).

Each script's own output and a JSON file of its figures go to --out (default: a new temporary
dir). Options after `--` are passed to every script (e.g. `-- --root /path/to/checkout`).

    .venv/bin/python bench/run_all.py                       # about 40 minutes on 2 cores
    .venv/bin/python bench/run_all.py --only latency,idle_gap -- --runs 3
    .venv/bin/python bench/run_all.py --only makespan,idle_gap,mixed,fairness -- --runs 1        # issue 15
    .venv/bin/python bench/run_all.py --only makespan,idle_gap,mixed,fairness -- --runs 1 --root /work/wt-old --sim-root .
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SCRIPTS = ["latency", "peer", "v2", "throughput", "flood", "scale", "websockets", "makespan", "idle_gap", "upload",
           "mixed", "fairness"]


def main() -> int:
    argv = sys.argv[1:]
    passed = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passed = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(SCRIPTS), help="comma-separated scripts to run")
    p.add_argument("--out", default=None, help="folder for each script's output and JSON")
    args = p.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-all-"))
    out.mkdir(parents=True, exist_ok=True)
    table = ["| figure | goal | measured (median of runs; min, max) | met | client | command |",
             "|---|---|---|---|---|---|"]
    for name in args.only.split(","):
        result = out / f"{name}.json"
        with open(out / f"{name}.txt", "w") as log:
            code = subprocess.call([sys.executable, str(BENCH / f"{name}.py"), "--json", str(result), *passed],
                                   stdout=log, stderr=subprocess.STDOUT)
        if code != 0 or not result.exists():
            table.append(f"| {name} | | failed (exit {code}; see {out / (name + '.txt')}) | | | |")
            continue
        data = json.loads(result.read_text())
        command = data["command"].split(" && ", 1)[-1].replace(f" --json {result}", "")
        for row in data["rows"]:
            met = {True: "yes", False: "**no**", None: ""}[row.get("met")]
            client = row.get("client") or data.get("client", "")
            table.append(f"| {row['figure']} | {row['goal']} | {row['value']} | {met} | {client} | `{command}` |")
        print(f"{name}: done ({out / (name + '.txt')})", file=sys.stderr, flush=True)
    print("\n".join(table))
    print(f"\n(outputs in {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
