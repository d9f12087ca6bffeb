"""The pretraining configuration: one dataclass, loaded from YAML/JSON, overridden from the command
line (cmgems.options), every field typed and documented; `--help` is generated from these docs.

Defaults are the GeneMask / CM-GEMS reference hyperparameters;
launchers/configs/quick.yaml shrinks them to a run that finishes in minutes on a laptop CPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any

from cmgems.data.packing import PACKED_ATTENTION
from cmgems.masking.curriculum import CM_STEP_DRAWS, EVAL_MASKINGS, SWITCH_RULES
from cmgems.errors import InputError
from cmgems.masking.names import (ANCHOR_ORDERS, CM_GEMS, DEFAULT_PROBABILITY, GLOBAL_M_BINOMIAL,
                                  MASKINGS, PMI_LOOKUPS, check_global_m, parse_mode)
from cmgems.options import DEFAULT_SEED, check_fields, from_args, load_file, option
from cmgems.tracking.uri import check_tracking_uri

MODELS = ("logo", "dnabert")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Upper bounds that no real run reaches, so that a typo (an extra 0, a pasted hash) is refused
# up front instead of overflowing an int64 or allocating for days.
MAX_STEPS = 10**9
MAX_BATCH = 1 << 16
MAX_COUNT = 1 << 40
MAX_SEED = 2**32 - 1   # numpy.random.seed's limit; torch takes any of these

_f = option  # the field declarations below read better short


@dataclass
class PretrainConfig:
    # --- data -------------------------------------------------------------------------------
    data_dir: str = _f("data/ecoli_k12_mg1655", "Dataset directory (manifest.json + HDF5 shards) "
                       "written by `python -m preprocessing build`.")
    genome: str = _f("data/ecoli_k12_mg1655.fa.gz", "FASTA to preprocess into data_dir when "
                     "data_dir holds no dataset yet (the bundled E. coli K-12 genome by default).")
    min_count: int = _f(101, "Minimum k-mer count for an NPMI score when data_dir is built here.",
                        low=1, high=MAX_COUNT)
    max_length: int = _f(512, "Block size in tokens, [CLS] and [SEP] included; longer samples are "
                         "cut to their first max_length-2 tokens.", resume=True, low=8, high=512)
    num_workers: int = _f(2, "DataLoader worker processes per rank (each opens the HDF5 shards "
                          "itself); 0 reads in the training process.", low=0, high=256)
    packing: bool = _f(True, "Lay each micro-batch's samples back to back, so the model computes "
                       "real tokens only (same samples, same masks, attention kept inside each "
                       "sample); --no-packing pads every sample to the longest of its "
                       "micro-batch instead.")
    packed_attention: str = _f("auto", "Attention of a packed batch: 'auto' = flash-attn's "
                               "variable-length kernel where installed, else torch's own "
                               "(torch.nn.attention.varlen) on a CUDA GPU with 16-bit weights and "
                               "no attention dropout, else SDPA over rows of max_length with a "
                               "block-diagonal mask (the CPU); 'sdpa', 'torch_varlen' or 'flash_attn' take that path, "
                               "refused where it cannot run (docs/pretraining.md, Packing).",
                               choices=PACKED_ATTENTION)
    verify_data: bool = _f(True, "Check every shard's sha256 against the manifest before step 0 "
                           "(--no-verify-data skips it, at your own risk).")
    # --- model ------------------------------------------------------------------------------
    model: str = _f("logo", f"Architecture: one of {MODELS}: GeneMask's small LOGO or DNABERT's "
                   "BERT-base (sizes in cmgems/model/architectures.py).", resume=True)
    init_from: str = _f("", "HF/DNABERT model directory to initialise from (e.g. an export); "
                        "empty trains from scratch.")
    # --- masking curriculum -----------------------------------------------------------------
    mode: str = _f(CM_GEMS, "Masking schedule: cm_gems, cm_step, or fixed:<strategy> with "
                   f"strategy in {MASKINGS}.", resume=True)
    threshold: float = _f(1.0, "cm_gems: switch genemask -> global once validation perplexity "
                          "drops by less than this between consecutive evaluations.", resume=True,
                          low=0)
    switch_rule: str = _f("drop", "cm_gems: the perplexity change compared with the threshold: "
                          "'drop' = previous - current (signed); 'abs_change' = |previous - "
                          "current|; 'min_abs_change' = the smallest |change| between "
                          "consecutive evaluations so far (the published script).",
                          resume=True, choices=SWITCH_RULES)
    eval_masking: str = _f("frozen", "Validation masking for the perplexity the curriculum "
                           "watches: 'frozen' = the same positions at every evaluation, with "
                           "eval_strategy; 'fresh' = the training masking of the step drawn anew "
                           "at each evaluation (the published scripts). ppl_ref stays frozen.",
                           resume=True, choices=EVAL_MASKINGS)
    patience: int = _f(1, "cm_gems: consecutive evaluations below the threshold before switching.",
                       resume=True, low=1, high=MAX_STEPS)
    min_switch_step: int = _f(0, "cm_gems: never switch before this step.", low=0, high=MAX_STEPS)
    cm_step_draw: str = _f("batch", "cm_step: draw random-or-global once per micro-batch "
                           "('batch', as the public CM-Step code) or for every sample "
                           "('sample').", resume=True, choices=CM_STEP_DRAWS)
    min_scored_fraction: float = _f(0.5, "PMI strategies (genemask, global, cm_step, cm_gems) "
                                    "refuse a dataset whose NPMI table scores less than this "
                                    "fraction of the 4^k k-mers (manifest stats).", low=0, high=1)
    p_random: float = _f(DEFAULT_PROBABILITY["random"], "Centre probability of random "
                         "(DNABERT) masking.", resume=True, low=0, high=1, open="both")
    p_genemask: float = _f(DEFAULT_PROBABILITY["genemask"], "Centre probability of GeneMask "
                           "masking.", resume=True, low=0, high=1, open="both")
    p_global: float = _f(DEFAULT_PROBABILITY["global"], "Fraction of positions taken as global "
                         "top-NPMI centres.", resume=True, low=0, high=1, open="both")
    global_m: int | str = _f(0, "GLOBAL's number of top-NPMI anchors per sample: 0 = round(L x "
                             "p_global) for a sample of L tokens (7 at 510); N > 0 = N in every "
                             "sample (capped at L), p_global then unused by GLOBAL; 'binomial' = "
                             "the number of Bernoulli(p_global) draws over the sample's tokens, "
                             "random and possibly 0 (the published code).", resume=True)
    genemask_anchor_order: str = _f("top", "GeneMask with 9+ centres keeps ceil(n/2) anchors: "
                                    "'top' = the best by NPMI (GeneMask's rule); 'first' = "
                                    "those of the first ceil(n/2) centres, as the published "
                                    "CM-GEMS script's GeneMask stage.", resume=True,
                                    choices=ANCHOR_ORDERS)
    pmi_lookup: str = _f("token", "Where genemask and global (so cm_step and cm_gems too) read "
                         "a position's NPMI: 'token' = the k-mer at that position (the papers' "
                         "text); 'position' = the k-mer whose token id equals the position index, "
                         "as the authors' published code does (the same ranking for every "
                         "sequence of a length; docs/reproducing.md).", resume=True,
                         choices=PMI_LOOKUPS)
    eval_strategy: str = _f("", "Frozen masking for validation perplexity (the number the "
                            "curriculum watches); empty = the schedule's first stage.")
    # --- optimisation -----------------------------------------------------------------------
    max_steps: int = _f(10_000, "Optimizer steps to train for.", resume=True, low=1,
                        high=MAX_STEPS)
    micro_batch_size: int = _f(10, "Samples per rank per forward pass.", resume=True, low=1,
                               high=MAX_BATCH)
    grad_accum: int = _f(25, "Micro-batches accumulated per optimizer step.", resume=True, low=1,
                         high=MAX_BATCH)
    lr: float = _f(8e-4, "Peak learning rate (AdamW).", resume=True, low=0, open="low")
    beta1: float = _f(0.9, "AdamW beta1.", low=0, high=1, open="high")
    beta2: float = _f(0.98, "AdamW beta2.", low=0, high=1, open="high")
    eps: float = _f(1e-6, "AdamW epsilon.", low=0, open="low")
    weight_decay: float = _f(0.01, "AdamW weight decay (decoupled), not applied to biases and "
                             "LayerNorm weights.", low=0)
    warmup_steps: int = _f(500, "Linear warmup steps, then linear decay to 0 at max_steps.",
                           resume=True, low=0, high=MAX_STEPS)
    grad_clip: float = _f(1.0, "Gradient norm clipping (0 disables).", low=0)
    seed: int = _f(DEFAULT_SEED, "Seed of everything random: init, data order, masking, dropout.",
                   resume=True, low=0, high=MAX_SEED)
    # --- engine -----------------------------------------------------------------------------
    zero_stage: int = _f(0, "DeepSpeed ZeRO stage 0..3; picks ds_configs/zero<stage>.json.",
                         low=0, high=3)
    ds_config: str = _f("", "DeepSpeed JSON config to use instead (e.g. ds_configs/"
                        "zero2-offload.json); 'auto' values are filled from this config.")
    precision: str = _f("auto", f"One of {PRECISIONS}; auto = bf16 on a GPU that has it, else "
                        "fp32.", choices=PRECISIONS)
    compile: bool = _f(False, "torch.compile the model (DeepSpeed's engine.compile(); masking, "
                       "packing and the loader stay eager), with dynamic shapes: a few graphs "
                       "take every batch shape, compiled once (perf/compiled_graphs counts "
                       "them). The first step and the first evaluation pay the compilation "
                       "(tens of seconds on a CPU).")
    # --- evaluation, logging, checkpoints -----------------------------------------------------
    eval_interval: int = _f(500, "Steps between validation evaluations (and curriculum "
                            "decisions).", low=1, high=MAX_STEPS)
    eval_batches: int = _f(0, "Validation batches per rank per evaluation; 0 = the whole split.",
                           low=0, high=MAX_STEPS)
    log_interval: int = _f(10, "Steps between metric logs.", low=1, high=MAX_STEPS)
    save_interval: int = _f(1000, "Steps between checkpoints (one is always written at the end).",
                            low=1, high=MAX_STEPS)
    keep_checkpoints: int = _f(2, "Newest complete checkpoints kept; older ones are deleted.",
                               low=1, high=MAX_STEPS)
    export_interval: int = _f(0, "Steps between HF exports kept as export/step-<N>/ (never "
                              "pruned; the model at 1K steps of a 10K run); 0 = only the final "
                              "export/.", low=0, high=MAX_STEPS)
    output_dir: str = _f("", "Run directory (checkpoints, export, plots); default "
                         "runs/<run_name>.")
    run_name: str = _f("", "Run name (MLflow run name too); default <model>-<mode>-<time>.")
    experiment: str = _f("cmgems", "MLflow experiment name.")
    parent_run_id: str = _f("", "MLflow run to nest this run under (a comparison's parent run).")
    tracking_uri: str = _f("", "MLflow store; empty = MLFLOW_TRACKING_URI if set, else "
                           "sqlite:///<parent of output_dir>/mlflow.db (runs/mlflow.db by "
                           "default).")
    log_model: bool = _f(True, "Log each export as an MLflow model (transformers flavour, "
                         "fill-mask, with its tokenizer); --no-log-model logs none.")
    register_model: str = _f("", "Register the final export in the MLflow model registry under "
                             "this name (a new version per run); empty registers nothing.")
    license: str = _f("", "License of the exported weights in their model card (an SPDX id or a "
                      "Hugging Face Hub license name, e.g. apache-2.0); empty: unspecified.")
    system_metrics: bool = _f(True, "Log CPU, memory, disk, network (and GPU) use as MLflow "
                              "system/* metrics, every 10 s unless "
                              "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL says; needs psutil.")

    def __post_init__(self):
        errors = check_fields(self)
        if self.model not in MODELS:
            errors.append(f"model must be one of {MODELS}, got {self.model!r}")
        try:
            parse_mode(self.mode)
        except InputError:
            errors.append(f"mode must be cm_gems, cm_step or fixed:<{'|'.join(MASKINGS)}>, "
                          f"got {self.mode!r}")
        try:
            check_global_m(self.global_m)
        except InputError:
            errors.append(f"global_m must be an integer >= 0 or {GLOBAL_M_BINOMIAL!r}, got "
                          f"{self.global_m!r}")
        if self.eval_strategy and self.eval_strategy not in MASKINGS:
            errors.append(f"eval_strategy must be empty or one of {MASKINGS}")
        if self.eval_strategy and self.eval_masking == "fresh":
            errors.append("eval_strategy names a frozen validation masking; eval_masking "
                          "'fresh' evaluates with the training masking instead: give one")
        if not isinstance(self.compile, bool):
            errors.append(f"compile must be true or false, got {self.compile!r}")
        if self.register_model and not self.log_model:
            errors.append("register_model needs log_model (the registry holds logged models)")
        try:  # a store MLflow cannot open is refused now, not after DeepSpeed has started
            env = os.environ.get("MLFLOW_TRACKING_URI", "")
            if self.tracking_uri or env:
                check_tracking_uri(self.tracking_uri or env,
                                   "tracking_uri" if self.tracking_uri else "MLFLOW_TRACKING_URI")
        except InputError as e:
            errors.append(str(e))
        if errors:
            raise InputError("invalid config: " + "; ".join(errors))

    @property
    def probabilities(self) -> dict[str, float]:
        """{strategy: centre (random, genemask) or anchor (global) probability} for masking."""
        return {m: getattr(self, f"p_{m}") for m in MASKINGS}

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
