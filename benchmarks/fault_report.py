"""Fault report: run every fault and bad-input scenario (tests/test_faults.py, tests/test_bad_inputs.py)
and print what happened in each, as the tables of docs/faults.md and docs/errors.md.

    python benchmarks/fault_report.py            # all scenarios (about 20 minutes on 2 shared cores)
    python benchmarks/fault_report.py -k kill9   # a subset (pytest -k expression)

The scenarios are the tests themselves: each test appends its row (scenario, what happened, steps
lost, data lost; or bad input and its exact error) to a file named by CMGEMS_FAULT_REPORT /
CMGEMS_ERRORS_REPORT, so the report shows what was asserted, measured on this machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_faults.py", "tests/test_bad_inputs.py"]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", default="", help="pytest -k expression selecting scenarios")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fault-report-") as tmp:
        faults, errors = Path(tmp) / "faults.jsonl", Path(tmp) / "errors.jsonl"
        env = dict(os.environ, CMGEMS_FAULT_REPORT=str(faults), CMGEMS_ERRORS_REPORT=str(errors))
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS]
        if args.k:
            cmd += ["-k", args.k]
        start = time.perf_counter()
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        outcome = [ln for ln in res.stdout.splitlines() if ln.strip()][-1:] or ["(no output)"]
        fault_rows, error_rows = _rows(faults), _rows(errors)
    print(f"# Fault report ({' '.join(TESTS)}; pytest: {outcome[0]}; {seconds:.0f} s)\n")
    print(table(["scenario", "what happened", "steps lost", "data lost"],
                [[r["scenario"], r["happened"], r["steps_lost"], r["data_lost"]]
                 for r in fault_rows]))
    print(f"\n# Bad inputs ({len(error_rows)} cases: exit 2, one line, file named, nothing "
          f"written)\n")
    print(table(["bad input", "command", "exact error"],
                [[r["case"], r["command"], f"`{r['error']}`"] for r in error_rows]))
    if res.returncode != 0:
        print("\npytest failed:\n" + res.stdout[-6000:], file=sys.stderr)
    return res.returncode


if __name__ == "__main__":
    sys.exit(main())
