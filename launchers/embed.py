"""cmgems-embed: one vector per sequence or genome region from an exported (or finetuned) model.

    cmgems embed MODEL_DIR --fasta seqs.fa --out emb.h5
    cmgems embed MODEL_DIR --genome genome.fa --bed regions.bed --out emb.h5 --pool cls

The output HDF5 holds `embeddings` (n x hidden, float32) and `names` (the FASTA id, or
chrom:start-end(strand)), with the model's path and weights' sha256 as attributes. A sequence
longer than the window is cut into windows whose vectors are averaged, weighted by their tokens.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if (ROOT / "cmgems").is_dir():  # run from a checkout: its own cmgems, not an installed copy
    sys.path.insert(0, str(ROOT))

from cmgems.use.commands import load_model_and_regions, region_parser, run  # noqa: E402
from cmgems.use.embed import POOLS  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = region_parser("cmgems-embed", __doc__, "exported model directory (pretrained or "
                      "finetuned)", "output HDF5 file")
    p.add_argument("--pool", default="mean", choices=POOLS,
                   help="mean: over each window's real k-mer tokens (default); cls: the [CLS] "
                        "vector")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from cmgems.use.embed import embed, write_embeddings
        loaded, regions = load_model_and_regions(args, "base")
        vectors = embed(loaded, regions, pool=args.pool, stride=args.stride,
                        batch_size=args.batch_size)
        write_embeddings(args.out, vectors, regions, loaded, args.pool,
                         args.stride or loaded.window)
        print(f"{args.out}: {len(regions)} embeddings of size {vectors.shape[1]}")
        return 0

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
