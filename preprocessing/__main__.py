"""Command line: `python -m preprocessing {build,npmi,count,table,shard,finish} ...` (build and
npmi also as cmgems-build, cmgems-npmi; the other four are the job-array stages of build)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cmgems.errors import EXIT_INPUT_ERROR, InputError
from preprocessing.array import count_stage, finish_stage, parse_group, shard_stage, table_stage
from preprocessing.build import BuildConfig, build, build_table

_FMT = argparse.ArgumentDefaultsHelpFormatter


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("genome", type=Path, help="genome FASTA (plain, gzip or bgzip; multi-record)")
    p.add_argument("--k", type=int, default=6, help="k-mer length, 3..6")
    p.add_argument("--min-count", type=int, default=101,
                   help="NPMI's c: k-mers seen fewer times get no score")
    p.add_argument("--workers", type=int, default=1,
                   help="processes counting and cutting pieces of the genome (1: all in this "
                        "process; the output is the same for any number)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cmgems-build", formatter_class=_FMT,
        description="Genome -> NPMI table (npmi.tsv), HDF5 token shards and manifest.json in "
                    "OUT_DIR. Same inputs and parameters again: 'up to date', nothing rewritten.")
    _common(p)
    p.add_argument("out_dir", type=Path, help="dataset directory to create")
    _dataset_options(p)
    return p


def _dataset_options(p: argparse.ArgumentParser) -> None:
    """The options that shape the dataset (build's, also given to the array's `count`)."""
    # SUPPRESS: these defaults depend on other options or mean "none"; the help says so
    p.add_argument("--valid-fraction", type=float, default=argparse.SUPPRESS,
                   help="share of samples (seeded) for the validation split; default 0.02, "
                        "or 0 with --valid-records")
    p.add_argument("--valid-records", default=argparse.SUPPRESS,
                   help="comma-separated record names whose samples all go to validation")
    p.add_argument("--seed", type=int, default=0, help="seed of sample lengths and split")
    p.add_argument("--npmi-table", type=Path, default=argparse.SUPPRESS,
                   help="use this NPMI table (our npmi.tsv, or GeneMask's CSV with ngram, "
                        "norm_dp_true_pmi) instead of counting the genome")
    p.add_argument("--shard-tokens", type=int, default=4_000_000,
                   help="tokens per shard (whole samples; the last shard smaller)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a dataset in OUT_DIR built with other parameters")


def npmi_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cmgems-npmi", formatter_class=_FMT,
        description="Genome -> NPMI table of all 4^k k-mers (columns kmer count pmi npmi rank).")
    _common(p)
    p.add_argument("out", type=Path, help="table to write (TSV)")
    return p


_ARRAY = ("Stages of `build` for a Slurm job array (launchers/slurm/preprocess.sbatch): "
          "count (array) -> table -> shard (array) -> finish; the dataset is identical to "
          "`build`'s. ")


def _group(p: argparse.ArgumentParser) -> None:
    p.add_argument("--group", required=True, metavar="i/N",
                   help="this task's group of records, 0 <= i < N (SLURM_ARRAY_TASK_ID/N)")


def count_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m preprocessing count", formatter_class=_FMT,
        description=_ARRAY + "Stage 1: n-gram counts and sample layout of every N-th piece of the "
                    "genome from piece i -> WORK/counts-i.npz; the first task records every "
                    "option in WORK/job.json for the later stages.")
    _common(p)
    p.add_argument("work", type=Path, help="work directory shared by the stages")
    _group(p)
    _dataset_options(p)
    return p


def table_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m preprocessing table", formatter_class=_FMT,
        description=_ARRAY + "Stage 2: sum every group's counts -> WORK/npmi.tsv (as build) and "
                    "plan the shards -> WORK/plan.npz.")
    p.add_argument("work", type=Path, help="work directory of the `count` stage")
    return p


def shard_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m preprocessing shard", formatter_class=_FMT,
        description=_ARRAY + "Stage 3: the shards of group i's 1/N of the genome (and fragments "
                    "of those shared with a neighbouring group) -> WORK, listed in "
                    "WORK/shards-i.json.")
    p.add_argument("genome", type=Path, help="the genome given to `count`")
    p.add_argument("work", type=Path, help="work directory of the `table` stage")
    _group(p)
    p.add_argument("--workers", type=int, default=1, help="processes cutting pieces")
    return p


def finish_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m preprocessing finish", formatter_class=_FMT,
        description=_ARRAY + "Stage 4: shards and manifest.json into OUT_DIR, atomically; "
                    "joins the shards shared by groups; refuses while a part is missing. "
                    "Removes WORK after success.")
    p.add_argument("work", type=Path, help="work directory of the `shard` stage")
    p.add_argument("out_dir", type=Path, help="dataset directory to create")
    p.add_argument("--keep-work", action="store_true", help="leave WORK in place")
    return p


def _run(fn) -> int:
    try:
        fn()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        print("interrupted: nothing written", file=sys.stderr)
        return 130
    return 0


def build_main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)

    def go():
        records = tuple(r.strip() for r in getattr(a, "valid_records", "").split(",") if r.strip())
        build(BuildConfig(genome=a.genome, out_dir=a.out_dir, k=a.k, min_count=a.min_count,
                          valid_fraction=getattr(a, "valid_fraction", None),
                          valid_records=records, seed=a.seed, workers=a.workers,
                          npmi_table=getattr(a, "npmi_table", None),
                          shard_tokens=a.shard_tokens, overwrite=a.overwrite))
    return _run(go)


def npmi_main(argv: list[str] | None = None) -> int:
    a = npmi_parser().parse_args(argv)
    return _run(lambda: build_table(a.genome, a.out, k=a.k, min_count=a.min_count,
                                    workers=a.workers))


def count_main(argv: list[str] | None = None) -> int:
    a = count_parser().parse_args(argv)

    def go():
        group = parse_group(a.group)
        records = tuple(r.strip() for r in getattr(a, "valid_records", "").split(",") if r.strip())
        count_stage(BuildConfig(genome=a.genome, out_dir=a.work, k=a.k, min_count=a.min_count,
                                valid_fraction=getattr(a, "valid_fraction", None),
                                valid_records=records, seed=a.seed, workers=a.workers,
                                npmi_table=getattr(a, "npmi_table", None),
                                shard_tokens=a.shard_tokens, overwrite=a.overwrite),
                    a.work, group)
    return _run(go)


def table_main(argv: list[str] | None = None) -> int:
    a = table_parser().parse_args(argv)

    def go():
        table_stage(a.work)
    return _run(go)


def shard_main(argv: list[str] | None = None) -> int:
    a = shard_parser().parse_args(argv)

    def go():
        if a.workers < 1:
            raise InputError(f"--workers: must be >= 1, got {a.workers}")
        shard_stage(a.genome, a.work, parse_group(a.group), a.workers)
    return _run(go)


def finish_main(argv: list[str] | None = None) -> int:
    a = finish_parser().parse_args(argv)

    def go():
        finish_stage(a.work, a.out_dir, keep_work=a.keep_work)
    return _run(go)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"build": build_main, "npmi": npmi_main, "count": count_main,
                "table": table_main, "shard": shard_main, "finish": finish_main}
    if not argv or argv[0] not in commands:
        print("usage: python -m preprocessing {build,npmi,count,table,shard,finish} ... "
              "(-h after a command for its options)", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else EXIT_INPUT_ERROR
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
