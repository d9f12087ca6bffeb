"""A training's Hugging Face exports: the weights gathered from every rank, written with their
model card (cmgems.model.architectures.export), and logged to MLflow as a model.

export/step-N/ is built aside and renamed into place (cmgems.pretrain.run_dir.publish_dir), so it
exists complete or not at all; the final export/ is written in place, since it holds the step
exports.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from cmgems.errors import InputError
from cmgems.model.architectures import export
from cmgems.model.card import render as render_model_card, summary
from cmgems.pretrain import checkpoint, distributed
from cmgems.pretrain.run_dir import publish_dir


def gather_state_dict(engine, is_main: bool) -> dict[str, torch.Tensor] | None:
    """fp32 weights of the model gathered to rank 0 (collective: every rank calls it; ZeRO-3
    partitions included); None on the other ranks."""
    import deepspeed
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        if not is_main:
            return None
        return {k.removeprefix("model."): v.detach().float().cpu().clone()
                for k, v in engine.module.state_dict().items()}


def write(engine, bert_config, info_of, dest: Path, final: bool, is_main: bool) -> None:
    """The HF export of the engine's current weights into dest (collective).

    Args:
        engine: the DeepSpeed engine of a cmgems MaskedLM.
        bert_config: the model's BertConfig.
        info_of: a function returning the export's cmgems.json content (called on rank 0 only,
            after the weights are gathered).
        dest: the export directory.
        final: export/ itself (written in place) rather than a step export (renamed into place).
        is_main: this is rank 0, the one rank that writes.
    Raises InputError on every rank when rank 0 cannot write it (a full disk named as such).
    """
    state = gather_state_dict(engine, is_main)

    def publish() -> None:
        info = info_of()
        card = render_model_card(info, bert_config)

        def fill(path: Path) -> None:
            export(state, bert_config, path, info, card)
        try:
            if final:
                fill(dest)
            else:
                publish_dir(fill, dest)
        except OSError as e:
            raise InputError(f"{dest}: cannot write the export: "
                             f"{checkpoint.write_failure(e, dest.parent)}") from None
    distributed.on_main(publish, is_main, catch=(InputError,))


def log_model(tracker, dest: Path, step: int, final: bool, registered_model_name: str) -> None:
    """The export as an MLflow logged model (rank 0); the final one registered under
    registered_model_name when given, and its URI tagged on the run."""
    info = dest / "cmgems.json"
    description = summary(json.loads(info.read_text())) if info.is_file() else ""
    uri = tracker.log_hf_model(dest, name="model" if final else dest.name, step=step,
                               registered_model_name=registered_model_name if final else "",
                               description=description)
    if uri and final:
        tracker.set_tag("model_uri", uri)
