"""The two architectures (ARCHITECTURES: GeneMask's small LOGO and DNABERT's BERT-base), both
transformers.BertForMaskedLM, and the HF export."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import BertConfig, BertForMaskedLM

from cmgems.errors import InputError
from cmgems.model.tokenizer import DNAKmerTokenizer
from cmgems.data.tokens import PAD_ID, k_from_vocab_size, vocab_size

ARCHITECTURES = {
    # BERT-base, as DNABERT.
    "dnabert": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12,
                    intermediate_size=3072, hidden_dropout_prob=0.1,
                    attention_probs_dropout_prob=0.1),
    # GeneMask's LOGO configuration.
    "logo": dict(num_hidden_layers=2, hidden_size=256, num_attention_heads=8,
                 intermediate_size=3072, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
}


def bert_config(name: str, k: int) -> BertConfig:
    return BertConfig(vocab_size=vocab_size(k), max_position_embeddings=512, pad_token_id=PAD_ID,
                      type_vocab_size=2, **ARCHITECTURES[name])


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Tied to the word embeddings: a state dict may leave it out.
TIED = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")


def _reason(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


def check_model_dir(init_from: str | Path, k: int | None = None) -> tuple[BertConfig, Path]:
    """(config, weights file) of an HF model directory, without loading the weights: raises
    InputError naming the file when the config is missing or unreadable, when there are no
    weights, or when the vocabulary is not the k-mer vocabulary (k given)."""
    path = Path(init_from)
    if not (path / "config.json").is_file():
        raise InputError(f"{path}: not a model directory (no config.json)")
    try:
        config = BertConfig.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise InputError(f"{path / 'config.json'}: not a readable BERT config ({_reason(e)})") \
            from None
    weights = next((path / w for w in WEIGHT_FILES if (path / w).is_file()), None)
    if weights is None:
        raise InputError(f"{path}: no weights ({' or '.join(WEIGHT_FILES)})")
    if k is not None and config.vocab_size != vocab_size(k):
        raise InputError(f"{path}: vocab size {config.vocab_size} is not the k={k} "
                         f"vocabulary ({vocab_size(k)}) of the dataset")
    return config, weights


def build_model(name: str, k: int, init_from: str = "") -> BertForMaskedLM:
    """A fresh model (initialised under the caller's seeded RNG), or one loaded from an HF dir.

    A directory to initialise from must hold a readable BERT config.json and weights that fill
    every parameter with finite numbers: transformers would otherwise initialise missing tensors
    at random with a warning, and a model that trains from partly random weights is a silent
    wrong result."""
    if not init_from:
        return BertForMaskedLM(bert_config(name, k))
    config, weights = check_model_dir(init_from, k)
    path = Path(init_from)
    from transformers.utils import logging as hf_logging
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its table of missing keys: the error below says it
    try:
        model, info = BertForMaskedLM.from_pretrained(path, config=config,
                                                      output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - safetensors, torch.load and transformers each differ
        raise InputError(f"{weights}: cannot load the weights (truncated or corrupt? "
                         f"{_reason(e)})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(m for m in info.get("missing_keys", ()) if m not in TIED)
    wrong = sorted(map(str, info.get("mismatched_keys", ())))
    if missing or wrong:
        raise InputError(f"{weights}: does not fill the model: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, wrong shape {wrong[:5]}")
    bad = next((n for n, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    if bad is not None:
        raise InputError(f"{weights}: tensor {bad} holds NaN or infinite values")
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_token(config: BertConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (non-embedding parameters) plus attention scores, the usual
    estimate (forward 2, backward 4 per multiply-accumulate)."""
    h, layers, ff = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    dense = layers * (4 * h * h + 2 * h * ff) + h * h + h * config.vocab_size  # + MLM head
    attention = layers * 2 * seq_len * h
    return 6.0 * (dense + attention)


def save_tokenizer(out_dir: str | Path, k: int, max_length: int) -> DNAKmerTokenizer:
    """The export's tokenizer, by save_pretrained: vocab.txt, tokenizer_config.json and a copy of
    cmgems/model/tokenizer.py that auto_map names, so that AutoTokenizer with trust_remote_code=True
    reads raw DNA where cmgems is not installed."""
    out_dir = Path(out_dir)
    tokenizer = DNAKmerTokenizer(k=k, model_max_length=max_length)
    tokenizer.register_for_auto_class("AutoTokenizer")
    tokenizer.save_pretrained(out_dir)
    # save_pretrained names the class it saved. Without trust_remote_code transformers builds the
    # class named here instead: BertTokenizer reads the same vocab.txt (k-mer text only); with
    # trust_remote_code, auto_map's DNAKmerTokenizer is used whatever this says.
    path = out_dir / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "BertTokenizer"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return tokenizer


def export(state_dict: dict[str, torch.Tensor], config: BertConfig, out_dir: str | Path,
           info: dict | None = None, card: str | None = None) -> Path:
    """An HF model directory: the model and its tokenizer by save_pretrained, cmgems.json (k and
    `info`: the run, data and curriculum it came from) and the model card README.md (`card`).
    Loadable by AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer,
    pipeline("fill-mask") and DNABERT's finetune scripts."""
    out_dir = Path(out_dir)
    model = BertForMaskedLM(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    # The decoder weight is tied to the word embeddings and may be absent from a state dict.
    missing = [m for m in missing if m != "cls.predictions.decoder.weight"]
    if missing or unexpected:
        raise ValueError(f"state dict does not fit the model: missing {missing}, "
                         f"unexpected {unexpected}")
    model.save_pretrained(out_dir)
    k = k_from_vocab_size(config.vocab_size)
    save_tokenizer(out_dir, k, config.max_position_embeddings)
    (out_dir / "cmgems.json").write_text(json.dumps({"k": k, **(info or {})}, indent=2))
    if card is not None:
        (out_dir / "README.md").write_text(card)
    return out_dir
