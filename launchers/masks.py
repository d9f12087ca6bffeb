"""cmgems masks: which positions a masking selects on a dataset's samples, before corruption.

For the first N samples of a split, each strategy's selected token indices ([CLS] = 0), with the
same seeded draws every time:

    cmgems masks --data-dir data/ecoli_k12_mg1655 --strategy global genemask --samples 4
    cmgems masks --data-dir D --strategy global --pmi-lookup position --json
    cmgems masks --data-dir D --png masks.png      # rows of samples, one panel per strategy

--json prints one object per sample and strategy per line: {"strategy", "sample", "length"
(real tokens with [CLS] and [SEP]), "selected"}.
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
from cmgems.masking.names import MASKINGS, PMI_LOOKUPS  # noqa: E402
from cmgems.options import parse_int  # noqa: E402


def _positive(text: str) -> int:
    value = parse_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cmgems masks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True,
                   help="dataset directory (manifest.json, npmi.tsv, shards)")
    p.add_argument("--strategy", nargs="+", choices=MASKINGS, default=list(MASKINGS),
                   help="maskings to show (default: %(default)s)")
    p.add_argument("--pmi-lookup", choices=PMI_LOOKUPS, default="token",
                   help="where genemask and global read NPMI: each token's k-mer, or the k-mer "
                        "whose id is the position, as the authors' code did (default: "
                        "%(default)s; docs/reproducing.md)")
    p.add_argument("--split", choices=("train", "valid"), default="valid",
                   help="(default: %(default)s)")
    p.add_argument("--samples", type=_positive, default=4, help="first N samples (default: 4)")
    p.add_argument("--max-length", type=_positive, default=512,
                   help="tokens per sample with [CLS] and [SEP], cut as training cuts "
                        "(default: 512)")
    p.add_argument("--seed", type=parse_int, default=0, help="seed of the draws (default: 0)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--png", type=Path, help="also draw them into this PNG")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cmgems.masking.view import selections, spans
    try:
        found = selections(args.data_dir, args.strategy, split=args.split, samples=args.samples,
                           seed=args.seed, max_length=args.max_length,
                           pmi_lookup=args.pmi_lookup)
        if args.png:
            from cmgems.io import atomic_path
            from cmgems.tracking.plots import masks_plot
            try:
                with atomic_path(args.png) as tmp:
                    masks_plot(found, tmp, f"{args.data_dir.name}, {args.split} split, "
                               f"pmi lookup: {args.pmi_lookup}")
            except OSError as e:
                raise InputError(f"{args.png}: cannot write ({e.strerror or e})") from None
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    for s in found:
        if args.json:
            print(json.dumps(s.to_json()))
        else:
            print(f"{s.strategy:>8}  sample {s.sample}  {s.length} tokens  "
                  f"{len(s.selected)} selected: {spans(s.selected)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
