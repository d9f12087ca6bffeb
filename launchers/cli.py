"""cmgems: every entry point under one command (`cmgems COMMAND -h` lists a command's options).

    cmgems build GENOME OUT_DIR         genome -> NPMI table, HDF5 shards, manifest.json
    cmgems npmi GENOME OUT.tsv          the NPMI table only
    cmgems pretrain [--config FILE]     pretraining in one process (several GPUs: the deepspeed
                                        launcher, `deepspeed --num_gpus N --module
                                        cmgems.launchers.pretrain ...`)
    cmgems finetune MODEL_DIR ...       few-shot or GUE-folder finetuning of an export
    cmgems gue GUE_ROOT MODEL_DIR ...   the GUE suite
    cmgems gue-compare A.json B.json    two GUE results: paired t-test, percent of a reference
    cmgems compare ...                  pretrain and evaluate every masking strategy
    cmgems masks --data-dir D ...       the positions each masking selects, printed or drawn
    cmgems embed MODEL_DIR ...          one vector per sequence or genome region (docs/use.md)
    cmgems predict MODEL_DIR ...        labels and probabilities from a finetuned classifier
    cmgems score-variants MODEL_DIR ... masked-marginal scores of the SNVs of a VCF
    cmgems count|table|shard|finish     the stages of `build` for a Slurm job array

The same commands run from a checkout without installing: `python -m preprocessing build`,
`python launchers/pretrain.py`, `python -m launchers.finetune`, ...
"""
from __future__ import annotations

import importlib
import sys

from cmgems.errors import EXIT_INPUT_ERROR

# command -> (module beside this one's package, function called with the remaining arguments)
_PREPROCESSING = ("build", "npmi", "count", "table", "shard", "finish")
COMMANDS = {**{c: ("preprocessing.__main__", "main") for c in _PREPROCESSING},
            "pretrain": ("launchers.pretrain", "main"), "finetune": ("launchers.finetune", "main"),
            "gue": ("launchers.gue", "main"), "compare": ("launchers.compare", "main"),
            "gue-compare": ("launchers.gue_compare", "main"), "masks": ("launchers.masks", "main"),
            "embed": ("launchers.embed", "main"), "predict": ("launchers.predict", "main"),
            "score-variants": ("launchers.score_variants", "main")}


def _module(name: str):
    """`name` as this installation spells it: top-level in a checkout (launchers.cli), inside
    cmgems when installed (cmgems.launchers.cli)."""
    parent = (__package__ or "launchers").rpartition(".")[0]
    return importlib.import_module(f"{parent}.{name}" if parent else name)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else EXIT_INPUT_ERROR
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; one of {', '.join(COMMANDS)} "
              f"(cmgems -h)", file=sys.stderr)
        return EXIT_INPUT_ERROR
    module, function = COMMANDS[command]
    run = getattr(_module(module), function)
    # preprocessing's main takes its own command word; the launchers take their options only
    return run(argv if command in _PREPROCESSING else rest)


if __name__ == "__main__":
    sys.exit(main())
