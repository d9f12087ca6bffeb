"""Command line: `python -m preprocessing {build,npmi,count,table,shard,finish} ...` (build and
npmi also as cmgems-build, cmgems-npmi; the other four are the job-array stages of build)."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from cmgems.options import add_arguments, from_args
from cmgems.errors import EXIT_INPUT_ERROR, InputError

from .array import count_stage, finish_stage, parse_group, shard_stage, table_stage
from .build import BuildConfig, build, build_table
from .output_dir import INTERRUPTS

# BuildConfig fields that are positional arguments, or also `npmi`'s options
_POSITIONAL = ("genome", "out_dir")
_NPMI_FIELDS = ("k", "min_count", "npmi_definition", "workers")


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=description)


def _genome(p: argparse.ArgumentParser, help: str = "genome FASTA (plain, gzip or bgzip; "
                                                     "multi-record)") -> None:
    p.add_argument("genome", type=Path, help=help)


def _build_options(p: argparse.ArgumentParser, title: str, only: tuple[str, ...] = ()) -> None:
    """BuildConfig's options (`only` these when given), defaults and help from its fields."""
    skip = _POSITIONAL + tuple(f.name for f in dataclasses.fields(BuildConfig)
                               if only and f.name not in only)
    add_arguments(p, BuildConfig, title=title, skip=skip)


def build_parser() -> argparse.ArgumentParser:
    p = _parser("cmgems-build", "Genome -> NPMI table (npmi.tsv), HDF5 token shards and "
                "manifest.json in OUT_DIR. Same inputs and parameters again: 'up to date', "
                "nothing rewritten.")
    _genome(p)
    p.add_argument("out_dir", type=Path, help="dataset directory to create")
    _build_options(p, "dataset options")
    return p


def npmi_parser() -> argparse.ArgumentParser:
    p = _parser("cmgems-npmi", "Genome -> NPMI table of all 4^k k-mers (columns kmer count pmi "
                "npmi rank).")
    _genome(p)
    p.add_argument("out", type=Path, help="table to write (TSV)")
    _build_options(p, "table options", only=_NPMI_FIELDS)
    return p


_ARRAY = ("Stages of `build` for a Slurm job array (launchers/slurm/preprocess.sbatch): "
          "count (array) -> table -> shard (array) -> finish; the dataset is identical to "
          "`build`'s. ")


def _group(p: argparse.ArgumentParser) -> None:
    p.add_argument("--group", required=True, metavar="i/N",
                   help="this task's group of records, 0 <= i < N (SLURM_ARRAY_TASK_ID/N)")


def count_parser() -> argparse.ArgumentParser:
    p = _parser("python -m preprocessing count", _ARRAY + "Stage 1: n-gram counts and sample "
                "layout of every N-th piece of the genome from piece i -> WORK/counts-i.npz; the "
                "first task records every option in WORK/job.json for the later stages.")
    _genome(p)
    p.add_argument("work", type=Path, help="work directory shared by the stages")
    _group(p)
    _build_options(p, "dataset options (as build's)")
    return p


def table_parser() -> argparse.ArgumentParser:
    p = _parser("python -m preprocessing table", _ARRAY + "Stage 2: sum every group's counts -> "
                "WORK/npmi.tsv (as build) and plan the shards -> WORK/plan.npz.")
    p.add_argument("work", type=Path, help="work directory of the `count` stage")
    return p


def shard_parser() -> argparse.ArgumentParser:
    p = _parser("python -m preprocessing shard", _ARRAY + "Stage 3: the shards of group i's 1/N "
                "of the genome (and fragments of those shared with a neighbouring group) -> "
                "WORK, listed in WORK/shards-i.json.")
    _genome(p, "the genome given to `count`")
    p.add_argument("work", type=Path, help="work directory of the `table` stage")
    _group(p)
    p.add_argument("--workers", type=int, default=BuildConfig.workers,
                   help=f"processes cutting pieces (default: {BuildConfig.workers})")
    return p


def finish_parser() -> argparse.ArgumentParser:
    p = _parser("python -m preprocessing finish", _ARRAY + "Stage 4: shards and manifest.json "
                "into OUT_DIR, atomically; joins the shards shared by groups; refuses while a "
                "part is missing. Removes WORK after success.")
    p.add_argument("work", type=Path, help="work directory of the `shard` stage")
    p.add_argument("out_dir", type=Path, help="dataset directory to create")
    p.add_argument("--keep-work", action="store_true", help="leave WORK in place (default: False)")
    return p


class _Formatter(logging.Formatter):
    """`warning: ...` lines, as errors are `error: ...`."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def _logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    logging.basicConfig(level=logging.WARNING, handlers=[handler])


def _run(fn, interrupted: str = "nothing written") -> int:
    """Run a command: InputError -> `error: ...`, exit 2; Ctrl-C -> one true line, exit 130."""
    _logging()
    try:
        fn()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        if INTERRUPTS.published is not None:     # the signal came while publishing
            interrupted = f"{INTERRUPTS.published} was already published, complete"
        print(f"interrupted: {interrupted}", file=sys.stderr)
        return 130
    return 0


def build_main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    return _run(lambda: build(from_args(BuildConfig, a)),
                f"nothing written ({a.out_dir} unchanged)")


def npmi_main(argv: list[str] | None = None) -> int:
    a = npmi_parser().parse_args(argv)
    given = {name: getattr(a, name) for name in _NPMI_FIELDS if getattr(a, name) is not None}
    return _run(lambda: build_table(a.genome, a.out, **given))


def count_main(argv: list[str] | None = None) -> int:
    a = count_parser().parse_args(argv)

    return _run(lambda: count_stage(from_args(BuildConfig, a, {"out_dir": a.work}), a.work,
                                    parse_group(a.group)),
                f"this task's counts not written (group {a.group}; run it again)")


def table_main(argv: list[str] | None = None) -> int:
    a = table_parser().parse_args(argv)
    return _run(lambda: table_stage(a.work))


def shard_main(argv: list[str] | None = None) -> int:
    a = shard_parser().parse_args(argv)

    def go():
        if a.workers < 1:
            raise InputError(f"--workers: must be >= 1, got {a.workers}")
        shard_stage(a.genome, a.work, parse_group(a.group), a.workers)
    return _run(go, f"this task's shards not recorded (group {a.group}; run it again)")


def finish_main(argv: list[str] | None = None) -> int:
    a = finish_parser().parse_args(argv)
    return _run(lambda: finish_stage(a.work, a.out_dir, keep_work=a.keep_work),
                f"nothing written ({a.out_dir} unchanged, {a.work} kept)")


COMMANDS = {
    "build": (build_main, "genome FASTA -> dataset in OUT_DIR: NPMI table, HDF5 token shards, "
                          "manifest"),
    "npmi": (npmi_main, "genome FASTA -> NPMI table of all 4^k k-mers (TSV) only"),
    "count": (count_main, "job-array stage 1: n-gram counts of one group of the genome's pieces"),
    "table": (table_main, "stage 2: NPMI table and shard plan from every group's counts"),
    "shard": (shard_main, "stage 3: the shards of one group"),
    "finish": (finish_main, "stage 4: shards and manifest into OUT_DIR, atomically"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    return "\n".join(["usage: python -m preprocessing COMMAND ...  (COMMAND -h: its options)", "",
                      "commands:", *(f"  {name:<{width}}  {text}"
                                     for name, (_, text) in COMMANDS.items()), "",
                      "count, table, shard and finish are build split into the stages of a Slurm "
                      "job array", "(launchers/slurm/preprocess.sbatch); the dataset is the "
                      "same."])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv or argv[0] not in COMMANDS:
        problem = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(f"{usage()}\n\nerror: {problem}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    return COMMANDS[argv[0]][0](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
