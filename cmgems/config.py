"""Configs as dataclasses, and the one way they meet a command line or a config file.

Every config (PretrainConfig here, FinetuneConfig, BuildConfig) declares its fields with `option`:
default, help text and whether the field decides a run's outcome (`resume=True`: a resumed run
must use the checkpoint's value). `add_arguments(parser, Cls)` makes one --option per field with
that help; `from_args(Cls, args, base)` builds the config from defaults <- base <- options given.
Validation lives in each config's __post_init__.

Pretraining defaults are the GeneMask / CM-GEMS reference hyperparameters;
launchers/configs/quick.yaml shrinks them to a run that finishes in minutes on a laptop CPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cmgems.errors import InputError

MODELS = ("logo", "dnabert")
STRATEGIES = ("random", "genemask", "global")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def option(default, help: str, *, resume: bool = False, flag: str | None = None,
           choices: tuple | None = None, cli: bool = True):
    """A config field: its default, its --help text, and
    resume: the field shapes what a run computes, so a resume must keep the checkpoint's value;
    flag: the command-line spelling when it is not --field-name; choices: allowed values;
    cli: False keeps the field off the command line (set by code or tests only)."""
    return field(default=default, metadata={"help": help, "resume": resume, "flag": flag,
                                            "choices": choices, "cli": cli})


_f = option  # the field declarations below read better short


def _base_type(hint) -> type:
    """int for `int` and `int | None`; tuple for tuple[str, ...]; the class otherwise."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin is tuple:
        return tuple
    if args and origin is not None and len(args) == 1:
        return _base_type(args[0])
    return hint


def field_types(cls) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: _base_type(hints[f.name]) for f in dataclasses.fields(cls)}


def resume_fields(cls) -> tuple[str, ...]:
    """Fields a resumed run must take unchanged from its checkpoint."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("resume"))


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


_PARSE = {tuple: _comma_list}


def add_arguments(parser: argparse.ArgumentParser, cls, *, title: str | None = None,
                  defaults: dict[str, Any] | None = None, skip: tuple[str, ...] = (),
                  only: tuple[str, ...] | None = None, prefix: str = ""):
    """One --option per field of dataclass `cls`, its help taken from the field's metadata; returns
    the argument group (a launcher may add an alias to it).

    Options default to None (not given), so from_args can tell an option from a default;
    `defaults` only changes the default shown in the help (e.g. a default config file's values;
    None shows none, for a help text that says what an absent option means). `only` limits the
    options to those fields. `prefix` ("finetune-") puts a second config on the same command line:
    --finetune-lr, read back by from_args(cls, args, prefix="finetune-").
    """
    group = parser.add_argument_group(title or f"{cls.__name__} fields")
    types = field_types(cls)
    for f in dataclasses.fields(cls):
        if (f.name in skip or (only is not None and f.name not in only)
                or not f.metadata.get("cli", True) or "help" not in f.metadata):
            continue
        flag = "--" + prefix + (f.metadata.get("flag") or "--" + f.name.replace("_", "-"))[2:]
        dest = _dest(prefix, f.name)
        typ = types[f.name]
        shown = (defaults or {}).get(f.name, f.default)
        if isinstance(shown, tuple):
            shown = ",".join(shown)
        help_text = f.metadata["help"] + ("" if shown is None else f" (default: {shown!r})")
        if typ is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction,
                               default=None, help=help_text)
        else:
            choices = f.metadata.get("choices")
            group.add_argument(flag, dest=dest, type=_PARSE.get(typ, typ), default=None,
                               choices=choices, help=help_text,
                               metavar=None if choices else typ.__name__.upper())
    return group


def _dest(prefix: str, name: str) -> str:
    return prefix.replace("-", "_") + name


def given_options(cls, args: argparse.Namespace, prefix: str = "") -> dict[str, Any]:
    """The fields of `cls` given on the command line (add_arguments' options that are not None)."""
    values = vars(args)
    return {f.name: values[_dest(prefix, f.name)] for f in dataclasses.fields(cls)
            if values.get(_dest(prefix, f.name)) is not None}


def from_args(cls, args: argparse.Namespace, base: dict[str, Any] | None = None,
              prefix: str = ""):
    """cls(defaults <- base <- the options given on the command line)."""
    return cls(**{**(base or {}), **given_options(cls, args, prefix)})


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
    model: str = _f("logo", f"Architecture: one of {MODELS} (DESIGN.md 'Models').", resume=True)
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
    p_random: float = _f(0.025, "Centre probability of random (DNABERT) masking.", resume=True)
    p_genemask: float = _f(0.0176, "Centre probability of GeneMask masking.", resume=True)
    p_global: float = _f(0.0136, "Fraction of positions taken as global top-NPMI centres.",
                         resume=True)
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
    seed: int = _f(42, "Seed of everything random: init, data order, masking, dropout.",
                   resume=True)
    # --- engine -----------------------------------------------------------------------------
    zero_stage: int = _f(0, "DeepSpeed ZeRO stage 0..3; picks ds_configs/zero<stage>.json.")
    ds_config: str = _f("", "DeepSpeed JSON config to use instead (e.g. ds_configs/"
                        "zero2-offload.json); 'auto' values are filled from this config.")
    precision: str = _f("auto", f"One of {PRECISIONS}; auto = bf16 on a GPU that has it, else fp32.")
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
        if self.mode not in ("cm_gems", "cm_step") and not (
                self.mode.startswith("fixed:") and self.mode[6:] in STRATEGIES):
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
        for name in ("p_random", "p_genemask", "p_global"):
            if not 0 < getattr(self, name) < 1:
                errors.append(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if not self.lr > 0:
            errors.append(f"lr must be > 0, got {self.lr}")
        if errors:
            raise InputError("invalid config: " + "; ".join(errors))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def first_strategy(self) -> str:
        return {"cm_gems": "genemask", "cm_step": "random"}.get(self.mode, self.mode[6:])


def _coerce(name: str, typ: type, value: Any, where: str):
    """Type-check a value from YAML/JSON (strict: 3 for a float is fine, '3' for an int is not)."""
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is bool and not isinstance(value, bool) or not isinstance(value, typ):
        raise InputError(f"{where}: field {name!r} must be {typ.__name__}, "
                         f"got {type(value).__name__} {value!r}")
    return value


def load_file(path: str | Path, cls=None) -> dict[str, Any]:
    """The fields of a YAML or JSON config file, type-checked against `cls` (PretrainConfig)."""
    types = field_types(cls or PretrainConfig)
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise InputError(f"{path}: cannot read config ({e.strerror})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        reason = " ".join(str(e).split())  # YAML's message spans lines; an error is one line
        raise InputError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} "
                         f"({reason})") from None
    data = data or {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: a config is a mapping of field: value, got {type(data).__name__}")
    unknown = sorted(set(data) - set(types))
    if unknown:
        raise InputError(f"{path}: unknown config field(s) {unknown}; see --help for the fields")
    return {k: _coerce(k, types[k], v, str(path)) for k, v in data.items()}


def from_sources(config_file: str | None, args: argparse.Namespace) -> PretrainConfig:
    """Defaults <- config file <- command-line options."""
    values = load_file(config_file) if config_file else {}
    cli = {k: v for k, v in vars(args).items() if k in field_types(PretrainConfig)
           and v is not None}
    try:
        return from_args(PretrainConfig, args, values)
    except InputError as e:
        # Say where the refused values came from: the file, unless options overrode them all.
        from_file = [k for k in values if k not in cli and re.search(rf"\b{k}\b", str(e))]
        raise InputError(f"{config_file if from_file else 'command line'}: {e}") from None
