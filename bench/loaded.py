#!/usr/bin/env python3
"""Run a bench script without waiting for a quiet machine and without repeating runs for
foreign load (the foreign load is still measured and printed). For A/B runs on a machine that
other work never leaves quiet, where `compare.py`'s alternation is what keeps the comparison
fair:

    .venv/bin/python bench/compare.py --roots base=/tmp/base,fix=. --rounds 3 -- loaded.py latency.py --runs 1
"""
import runpy
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import _common as c  # noqa: E402

c.wait_quiet = lambda *args, **kwargs: 0.0
c.MAX_FOREIGN = float("inf")
script = next(arg for arg in sys.argv[1:] if arg.endswith(".py"))
sys.argv.remove(script)
sys.argv[0] = str(BENCH / script)
runpy.run_path(str(BENCH / script), run_name="__main__")
