"""What embed, predict and score-variants share on the command line: the model, the inputs, the
window, the device, and the one way a bad input ends (its message, exit 2, no traceback)."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from cmgems.errors import EXIT_INPUT_ERROR, InputError
from cmgems.options import parse_int


def add_model_arguments(p: argparse.ArgumentParser, kind: str) -> None:
    p.add_argument("model_dir", type=Path, help=kind)
    g = p.add_argument_group("model")
    g.add_argument("--window", type=parse_int, default=None, metavar="TOKENS",
                   help="k-mer tokens per window (default: the block the model was trained on, "
                        "cmgems.json's max_length, less [CLS] and [SEP]); longer sequences are "
                        "cut into windows")
    g.add_argument("--batch-size", type=parse_int, default=32, metavar="N",
                   help="windows per forward pass (default 32)")
    g.add_argument("--device", default="auto",
                   help="auto (the GPU where there is one), cpu, cuda, cuda:N (default auto)")
    g.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="auto: bf16 on a GPU that has it, else fp32 (default auto)")


def add_region_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sequences (either --fasta, or --genome and --bed)")
    g.add_argument("--fasta", type=Path, help="FASTA of sequences (plain or gzip), one result "
                                              "per record, named by its id")
    g.add_argument("--genome", type=Path, help="genome FASTA, plain or bgzip-compressed; its "
                                               ".fai (and .gzi) index is built when absent")
    g.add_argument("--bed", type=Path, help="BED regions of --genome (0-based half-open; "
                                            "optional name, score, strand: '-' is "
                                            "reverse-complemented), named chrom:start-end(strand)")
    g.add_argument("--stride", type=parse_int, default=None, metavar="TOKENS",
                   help="tokens between the starts of consecutive windows (default: the window, "
                        "no overlap); the last window always ends at the sequence's end")


def region_parser(prog: str, doc: str, model_kind: str, out: str) -> argparse.ArgumentParser:
    """The command line of a command that reads a model and sequences or regions (embed,
    predict) and writes one file."""
    p = argparse.ArgumentParser(prog=prog, description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, model_kind)
    add_region_arguments(p)
    p.add_argument("--out", type=Path, required=True, help=out)
    return p


def check_positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise InputError(f"--{name} {value}: must be >= 1")


def load_model_and_regions(args: argparse.Namespace, head: str):
    """(the loaded model, its inputs) of an embed or predict command line, every number checked
    first: a bad window fails before the model is read."""
    from cmgems.use.genome import load_inputs
    from cmgems.use.windows import load_model
    for name in ("window", "stride", "batch_size"):
        check_positive(name.replace("_", "-"), getattr(args, name))
    loaded = load_model(args.model_dir, head, window=args.window, device=args.device,
                        precision=args.precision)
    return loaded, load_inputs(args.fasta, args.genome, args.bed, loaded.k)


def run(body: Callable[[], int]) -> int:
    """Run a command's body: an InputError is one line on stderr and exit 2."""
    from cmgems.progress import quiet_library_bars
    quiet_library_bars()
    try:
        return body()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INPUT_ERROR
