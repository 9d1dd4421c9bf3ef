"""The README's test command on a busy machine: its wall time with N busy processes beside it.

A simulation started beside other work must get its share of the CPU: Ray starts its
workers 15 nicer than the driver unless told otherwise, and beside any normal-priority
process they starved (issue 28: the suite failed discovery beside three busy jobs).  This
starts ``N`` busy processes at normal priority (a Python loop each), runs the README test
command in the repository, and stops them; for each ``N`` of ``--busy`` it records whether
the command passed, its wall time and pytest's summary line.  A script, not a timed test:
the figure depends on the machine.

    python3 benchmarks/busy_suite.py --busy 0,2        # from the repository root

The virtual environment is created first, outside the timing (``make`` with the install
stamp), so both ways time the same lint, type check and suite.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_COMMAND = ["make", "test"]  # the README's test command
BUSY = [sys.executable, "-c", "while True: pass"]


def run_beside(busy: int, log: Path) -> dict[str, object]:
    """The test command with ``busy`` busy processes at normal priority beside it."""
    hogs = [subprocess.Popen(BUSY) for _ in range(busy)]
    try:
        t0 = time.monotonic()
        with log.open("w") as out:
            rc = subprocess.call(TEST_COMMAND, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        seconds = time.monotonic() - t0
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    summary = [line for line in log.read_text().splitlines() if re.search(r"\d+ (passed|failed)", line)]
    return {"busy": busy, "rc": rc, "seconds": round(seconds, 1), "summary": summary[-1] if summary else ""}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", default="0,2", help="comma-separated counts of busy processes")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "busy_suite.json"))
    args = parser.parse_args()
    subprocess.check_call(["make", ".venv/.fedpeft-installed", "system-deps"], cwd=ROOT)
    rows = []
    for busy in (int(n) for n in args.busy.split(",")):
        row = run_beside(busy, Path(tempfile.gettempdir()) / f"fedpeft_busy_suite_{busy}.log")
        rows.append(row)
        print(f"{busy} busy | rc {row['rc']} | {row['seconds'] / 60:.1f} min | {row['summary']}", flush=True)
    print("\n| busy processes | passed | wall time | pytest |\n|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['busy']} | {'yes' if row['rc'] == 0 else 'NO'} | {row['seconds'] / 60:.1f} min | {row['summary']} |"
        )
    Path(args.out).write_text(json.dumps({"command": " ".join(TEST_COMMAND), "rows": rows}, indent=1) + "\n")
    return 0 if all(row["rc"] == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
