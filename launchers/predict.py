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

from cmgems.use.commands import (add_model_arguments, add_region_arguments,  # noqa: E402
                                 check_positive, run)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cmgems-predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, "finetuned classifier directory (cmgems finetune --save-model)")
    add_region_arguments(p)
    p.add_argument("--out", type=Path, required=True, help="output TSV file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from cmgems.use.genome import load_inputs
        from cmgems.use.predict import labels, predict, write_predictions
        from cmgems.use.windows import load_model
        for name in ("window", "stride", "batch_size"):
            check_positive(name.replace("_", "-"), getattr(args, name))
        loaded = load_model(args.model_dir, "classifier", window=args.window,
                            device=args.device, precision=args.precision)
        regions = load_inputs(args.fasta, args.genome, args.bed, loaded.k)
        probs = predict(loaded, regions, stride=args.stride, batch_size=args.batch_size)
        write_predictions(args.out, probs, regions, labels(loaded))
        print(f"{args.out}: predictions for {len(regions)} sequences")
        return 0

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
