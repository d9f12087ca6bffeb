"""cmgems-score-variants: the masked-marginal score of each SNV of a VCF under a model's masked-LM
head: with every k-mer covering the variant masked, log P(ALT k-mers) - log P(REF k-mers), in a
window of the genome centred on the variant.

    cmgems score-variants MODEL_DIR --genome genome.fa --vcf variants.vcf.gz --out scores.tsv

Output TSV: chrom, pos, ref, alt, score, window, note. A REF that does not match the genome gets
score NA and a note on its row; indels and other non-SNV alleles are skipped, and their count is
printed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if (ROOT / "cmgems").is_dir():  # run from a checkout: its own cmgems, not an installed copy
    sys.path.insert(0, str(ROOT))

from cmgems.use.commands import add_model_arguments, check_positive, run  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cmgems-score-variants", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, "exported model directory with its masked-LM head (a pretraining "
                           "export)")
    p.add_argument("--genome", type=Path, required=True,
                   help="genome FASTA, plain or bgzip-compressed (indexed when needed)")
    p.add_argument("--vcf", type=Path, required=True, help="variants: VCF, plain or gzip")
    p.add_argument("--out", type=Path, required=True, help="output TSV file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from cmgems.use.genome import Genome
        from cmgems.use.variants import read_vcf, score_variants, write_scores
        from cmgems.use.windows import load_model
        for name in ("window", "batch_size"):
            check_positive(name.replace("_", "-"), getattr(args, name))
        with Genome(args.genome) as genome:
            records = read_vcf(args.vcf, genome)
            loaded = load_model(args.model_dir, "mlm", window=args.window, device=args.device,
                                precision=args.precision)
            rows = score_variants(loaded, genome, records.snvs, batch_size=args.batch_size)
        write_scores(args.out, rows)
        mismatched = sum(1 for r in rows if r["note"])
        print(f"{args.out}: {len(rows)} SNVs ({mismatched} not scored, see the note column); "
              f"{records.skipped} indel or other non-SNV alleles skipped")
        return 0

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
