"""The pretraining configuration: one dataclass, loaded from YAML/JSON, overridden from the command
line (cmgems.options), every field typed and documented; `--help` is generated from these docs.

Defaults are the GeneMask / CM-GEMS reference hyperparameters;
launchers/configs/quick.yaml shrinks them to a run that finishes in minutes on a laptop CPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from cmgems.curriculum import MODES
from cmgems.errors import InputError
from cmgems.masking import DEFAULT_PROBABILITY, STRATEGIES
from cmgems.options import DEFAULT_SEED, from_args, load_file, option

MODELS = ("logo", "dnabert")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

_f = option  # the field declarations below read better short


@dataclass
class PretrainConfig:
    # --- data -------------------------------------------------------------------------------
    data_dir: str = _f("data/ecoli_k12_mg1655", "Dataset directory (manifest.json + HDF5 shards) "
                       "written by `python -m preprocessing build`.")
    genome: str = _f("data/ecoli_k12_mg1655.fa.gz", "FASTA to preprocess into data_dir when "
                     "data_dir holds no dataset yet (the bundled E. coli K-12 genome by default).")
    min_count: int = _f(101, "Minimum k-mer count for an NPMI score when data_dir is built here.")
    max_length: int = _f(512, "Block size in tokens, [CLS] and [SEP] included; longer samples are "
                         "cut to their first max_length-2 tokens.", resume=True)
    num_workers: int = _f(2, "DataLoader worker processes per rank (each opens the HDF5 shards "
                          "itself); 0 reads in the training process.")
    verify_data: bool = _f(True, "Check every shard's sha256 against the manifest before step 0 "
                           "(--no-verify-data skips it, at your own risk).")
    # --- model ------------------------------------------------------------------------------
    model: str = _f("logo", f"Architecture: one of {MODELS}: GeneMask's small LOGO or DNABERT's "
                   "BERT-base (sizes in cmgems/models.py).", resume=True)
    init_from: str = _f("", "HF/DNABERT model directory to initialise from (e.g. an export); "
                        "empty trains from scratch.")
    # --- masking curriculum -----------------------------------------------------------------
    mode: str = _f("cm_gems", "Masking schedule: cm_gems, cm_step, or fixed:<strategy> with "
                   f"strategy in {STRATEGIES}.", resume=True)
    threshold: float = _f(1.0, "cm_gems: switch genemask -> global once validation perplexity "
                          "drops by less than this between consecutive evaluations.", resume=True)
    patience: int = _f(1, "cm_gems: consecutive evaluations below the threshold before switching.",
                       resume=True)
    min_switch_step: int = _f(0, "cm_gems: never switch before this step.")
    p_random: float = _f(DEFAULT_PROBABILITY["random"], "Centre probability of random "
                         "(DNABERT) masking.", resume=True)
    p_genemask: float = _f(DEFAULT_PROBABILITY["genemask"], "Centre probability of GeneMask "
                           "masking.", resume=True)
    p_global: float = _f(DEFAULT_PROBABILITY["global"], "Fraction of positions taken as global "
                         "top-NPMI centres.", resume=True)
    eval_strategy: str = _f("", "Frozen masking for validation perplexity (the number the "
                            "curriculum watches); empty = the schedule's first stage.")
    # --- optimisation -----------------------------------------------------------------------
    max_steps: int = _f(10_000, "Optimizer steps to train for.", resume=True)
    micro_batch_size: int = _f(10, "Samples per rank per forward pass.", resume=True)
    grad_accum: int = _f(25, "Micro-batches accumulated per optimizer step.", resume=True)
    lr: float = _f(8e-4, "Peak learning rate (AdamW).", resume=True)
    beta1: float = _f(0.9, "AdamW beta1.")
    beta2: float = _f(0.98, "AdamW beta2.")
    eps: float = _f(1e-6, "AdamW epsilon.")
    weight_decay: float = _f(0.01, "AdamW weight decay.")
    warmup_steps: int = _f(500, "Linear warmup steps, then linear decay to 0 at max_steps.",
                           resume=True)
    grad_clip: float = _f(1.0, "Gradient norm clipping (0 disables).")
    seed: int = _f(DEFAULT_SEED, "Seed of everything random: init, data order, masking, dropout.",
                   resume=True)
    # --- engine -----------------------------------------------------------------------------
    zero_stage: int = _f(0, "DeepSpeed ZeRO stage 0..3; picks ds_configs/zero<stage>.json.")
    ds_config: str = _f("", "DeepSpeed JSON config to use instead (e.g. ds_configs/"
                        "zero2-offload.json); 'auto' values are filled from this config.")
    precision: str = _f("auto", f"One of {PRECISIONS}; auto = bf16 on a GPU that has it, else "
                        "fp32.")
    # --- evaluation, logging, checkpoints -----------------------------------------------------
    eval_interval: int = _f(500, "Steps between validation evaluations (and curriculum decisions).")
    eval_batches: int = _f(0, "Validation batches per rank per evaluation; 0 = the whole split.")
    log_interval: int = _f(10, "Steps between metric logs.")
    save_interval: int = _f(1000, "Steps between checkpoints (one is always written at the end).")
    keep_checkpoints: int = _f(2, "Newest complete checkpoints kept; older ones are deleted.")
    output_dir: str = _f("", "Run directory (checkpoints, export, plots); default "
                         "runs/<run_name>.")
    run_name: str = _f("", "Run name (MLflow run name too); default <model>-<mode>-<time>.")
    experiment: str = _f("cmgems", "MLflow experiment name.")
    parent_run_id: str = _f("", "MLflow run to nest this run under (a comparison's parent run).")

    def __post_init__(self):
        errors = []
        if self.model not in MODELS:
            errors.append(f"model must be one of {MODELS}, got {self.model!r}")
        if self.mode not in MODES:
            errors.append(f"mode must be cm_gems, cm_step or fixed:<{'|'.join(STRATEGIES)}>, "
                          f"got {self.mode!r}")
        if self.eval_strategy and self.eval_strategy not in STRATEGIES:
            errors.append(f"eval_strategy must be empty or one of {STRATEGIES}")
        if self.precision not in PRECISIONS:
            errors.append(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            errors.append(f"zero_stage must be 0..3, got {self.zero_stage}")
        if not 8 <= self.max_length <= 512:
            errors.append(f"max_length must be in 8..512 (BERT positions), got {self.max_length}")
        for name in ("max_steps", "micro_batch_size", "grad_accum", "eval_interval",
                     "log_interval", "save_interval", "keep_checkpoints", "patience"):
            if getattr(self, name) < 1:
                errors.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_batches", "num_workers", "min_switch_step", "grad_clip"):
            if getattr(self, name) < 0:
                errors.append(f"{name} must be >= 0, got {getattr(self, name)}")
        for strategy, p in self.probabilities.items():
            if not 0 < p < 1:
                errors.append(f"p_{strategy} must be in (0, 1), got {p}")
        if not self.lr > 0:
            errors.append(f"lr must be > 0, got {self.lr}")
        if errors:
            raise InputError("invalid config: " + "; ".join(errors))

    @property
    def probabilities(self) -> dict[str, float]:
        """{strategy: centre (random, genemask) or anchor (global) probability} for masking."""
        return {"random": self.p_random, "genemask": self.p_genemask, "global": self.p_global}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def from_sources(config_file: str | None, args: argparse.Namespace) -> PretrainConfig:
    """Defaults <- config file <- command-line options."""
    values = load_file(config_file, PretrainConfig) if config_file else {}
    overridden = {k for k, v in vars(args).items() if k in values and v is not None}
    try:
        return from_args(PretrainConfig, args, values)
    except InputError as e:
        # Say where the refused values came from: the file, unless options overrode them all.
        from_file = [k for k in values if k not in overridden and re.search(rf"\b{k}\b", str(e))]
        raise InputError(f"{config_file if from_file else 'command line'}: {e}") from None
