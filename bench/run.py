"""Run every benchmark in bench/ (each a standalone script printing its figures).

    python bench/run.py                 # all of them
    python bench/run.py rate_budget     # those whose name contains "rate_budget"
    python bench/run.py -- --window 10  # pass arguments through to each script
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    extra: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1:]
    scripts = sorted(p for p in HERE.glob("bench_*.py") if not argv or any(a in p.stem for a in argv))
    failed = 0
    for script in scripts:
        print(f"=== {script.stem} ===", flush=True)
        started = time.monotonic()
        code = subprocess.call([sys.executable, str(script), *extra])
        print(f"=== {script.stem}: exit {code} in {time.monotonic() - started:.0f}s ===\n", flush=True)
        failed += code != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
