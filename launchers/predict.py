"""cmgems-predict: the label and class probabilities of each sequence or genome region from a
finetuned classifier (`cmgems finetune ... --save-model DIR` writes one).

    cmgems predict FINETUNED_DIR --fasta seqs.fa --out predictions.tsv
    cmgems predict FINETUNED_DIR --genome genome.fa --bed regions.bed --out predictions.tsv

Output TSV: name, label, p_<label> per class. A sequence longer than the window is cut into
windows; their logits are averaged before the softmax.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if (ROOT / "cmgems").is_dir():  # run from a checkout: its own cmgems, not an installed copy
    sys.path.insert(0, str(ROOT))

from cmgems.use.commands import load_model_and_regions, region_parser, run  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    return region_parser("cmgems-predict", __doc__, "finetuned classifier directory (cmgems "
                         "finetune --save-model)", "output TSV file")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from cmgems.use.predict import labels, predict, write_predictions
        loaded, regions = load_model_and_regions(args, "classifier")
        probs = predict(loaded, regions, stride=args.stride, batch_size=args.batch_size)
        write_predictions(args.out, probs, regions, labels(loaded))
        print(f"{args.out}: predictions for {len(regions)} sequences")
        return 0

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
