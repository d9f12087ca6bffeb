"""cmgems gue-compare: two models' GUE results with the CM-GEMS paper's statistics.

    cmgems gue-compare runs/gue-random/gue.json runs/gue-cm_gems/gue.json \\
        --reference data/gue_reference_mcc.tsv --reference-model DNABERT-2

A and B are gue.json files of `cmgems gue` (FILE@MODEL picks one model of a file holding
several). Printed: test MCC x 100 per task for both, their difference, the means (human,
non-human), the paired t-test over the tasks both ran (the paper's Table 3) with the mean
difference, a 95 % percentile bootstrap interval and a verdict, and with --reference each model's
percent of the reference model's MCC per task (the paper's Fig. 3). virus/covid is left out of
the means and the test by default, as in the papers' 27-task averages (--with-covid includes it;
the other non-human mean is printed either way). --json prints the same as one JSON object.
Bad input exits 2 naming the file.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if (ROOT / "cmgems").is_dir():  # run from a checkout: its own cmgems, not an installed copy
    sys.path.insert(0, str(ROOT))

from cmgems.errors import EXIT_INPUT_ERROR, InputError  # noqa: E402
from cmgems.evaluation.gue_compare import (compare, load_gue, load_reference,  # noqa: E402
                                           markdown)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cmgems gue-compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="gue.json of model A (FILE or FILE@MODEL)")
    p.add_argument("b", help="gue.json of model B (FILE or FILE@MODEL)")
    p.add_argument("--reference", type=Path, default=None,
                   help="TSV of published MCC x 100 per task (header: task<TAB>MODEL...), e.g. "
                        "data/gue_reference_mcc.tsv")
    p.add_argument("--reference-model", default=None,
                   help="column of the reference table to take percentages of (default: its "
                        "first)")
    p.add_argument("--with-covid", action="store_true",
                   help="count virus/covid in the means and the test (the papers leave it out)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        a, b = load_gue(args.a), load_gue(args.b)
        reference = load_reference(args.reference) if args.reference else None
        if args.reference_model and reference is None:
            raise InputError("--reference-model needs --reference")
        result = compare(a, b, reference, args.reference_model, include_covid=args.with_covid)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    print(json.dumps(result, indent=2) if args.json else markdown(result), end="\n"
          if args.json else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
