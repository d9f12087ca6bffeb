"""A pretraining run's inputs and output checked before DeepSpeed starts: a wrong path, a taken
output directory or an unreadable DeepSpeed config fails in a second, not after the process group
and the op compilation (tens of seconds) or a dataset build.

The trainer checks the same things again where it uses them (and more: shard hashes, sample
counts per rank); these checks need no process group, so every rank runs them alike.
"""
from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import torch

from cmgems.pretrain import checkpoint
from cmgems.model import architectures
from cmgems.pretrain.config import PretrainConfig
from cmgems.pretrain.engine import build_ds_config
from cmgems.errors import InputError
from cmgems.data.layout import SPLITS, DatasetDir
from cmgems.data.shards import Manifest
from cmgems.masking.names import uses_pmi
from cmgems.pretrain.layout import RunLayout


def default_output_dir(cfg: PretrainConfig) -> tuple[str, Path]:
    """(run name, run directory): as given, else <model>-<mode>-<start time> under runs/."""
    name = cfg.run_name or f"{cfg.model}-{cfg.mode.replace(':', '-')}-" \
                          f"{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    return name, Path(cfg.output_dir) if cfg.output_dir else Path("runs") / name


def check(cfg: PretrainConfig, resume: bool) -> None:
    """Raise InputError for the first thing that would stop this run later."""
    named = bool(cfg.output_dir or cfg.run_name)  # else a fresh timestamped directory
    if resume and not named:
        raise InputError("--resume needs the run to continue: --output-dir DIR or --run-name "
                         "NAME (the default run name carries the start time)")
    if named:
        _check_output(default_output_dir(cfg)[1], resume)
    _check_data(cfg)
    # the DeepSpeed config as the trainer will fill it ("auto" values, batch sizes per rank)
    build_ds_config(cfg, int(os.environ.get("WORLD_SIZE") or 1), torch.device("cpu"),
                    announce=False)
    if cfg.init_from:
        architectures.check_model_dir(cfg.init_from)


def _check_output(out: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory; choose another --output-dir")
    checkpoint.refuse_earlier_run(out, RunLayout(out).checkpoints, resume)
    parent = next((p for p in (out, *out.parents) if p.exists()), None)
    if parent is not None and not os.access(parent, os.W_OK):
        raise InputError(f"{out}: cannot be written ({parent} is not writable)")


def _check_data(cfg: PretrainConfig) -> None:
    data = DatasetDir(cfg.data_dir)
    if data.holds_dataset():
        manifest = Manifest.load(data.root)
        for split in SPLITS:
            if not manifest.split_shards(split):
                raise InputError(f"{data.manifest}: no {split!r} shards; a run needs "
                                 f"both splits (rebuild it with a validation split)")
        check_scored(cfg, manifest)
    elif not Path(cfg.genome).is_file():
        raise InputError(f"{data.root}: holds no dataset ({data.manifest.name}), and the genome "
                         f"to build it from, {cfg.genome}, is not a file (--genome GENOME, or --data-dir of a "
                         f"built dataset)")


def check_scored(cfg: PretrainConfig, manifest: Manifest) -> float:
    """The share of the 4^k k-mers the dataset's NPMI table scores; InputError when a PMI masking
    is asked for on a table that scores less than min_scored_fraction. There, PMI masking would
    rank ties, which is random masking under another name: refused rather than reported as PMI
    masking."""
    scored = _scored_fraction(manifest, DatasetDir(cfg.data_dir))
    wanted = [s for s in (cfg.mode, cfg.eval_strategy) if s and uses_pmi(s)]
    if wanted and scored < cfg.min_scored_fraction:
        raise InputError(
            f"{DatasetDir(cfg.data_dir).manifest}: its NPMI table scores {scored:.1%} of the "
            f"{4 ** manifest.k:,} {manifest.k}-mers, below min_scored_fraction "
            f"{cfg.min_scored_fraction:g}: {wanted[0]} would mask by ties; rebuild with a lower "
            f"--min-count or a larger genome (or pass --min-scored-fraction to accept it)")
    return scored


def _scored_fraction(manifest: Manifest, data: DatasetDir) -> float:
    stats = manifest.stats or {}
    if "npmi_scored_fraction" in stats:
        return float(stats["npmi_scored_fraction"])
    if "npmi_scored" in stats:
        return int(stats["npmi_scored"]) / 4 ** manifest.k
    import numpy as np
    from cmgems.data.npmi_table import load_table  # a manifest from before the stats had it
    return float((~np.isnan(load_table(data.npmi_table, manifest.k))).mean())
