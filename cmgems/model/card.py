"""What an export says about itself: the figures of its dataset, and its model card (README.md).

The card is written from the export's cmgems.json content (`info`, as the trainer makes it) and
the model's BertConfig: architecture, data with its checksums, steps, masking schedule and switch
step, reference perplexity, how to load it (transformers, pipeline, MLflow, DNABERT's scripts).
"""
from __future__ import annotations

from pathlib import Path

from transformers import BertConfig

from cmgems.data.layout import SPLITS
from cmgems.data.shards import Manifest
from cmgems.masking.names import CM_GEMS


def dataset_summary(manifest: Manifest, data_dir: str | Path) -> dict:
    """The dataset a model was trained on, in figures (logged as the run's MLflow dataset input
    and kept in the export)."""
    splits = {}
    for split in SPLITS:
        shards = manifest.split_shards(split)
        splits[f"{split}_samples"] = sum(s["samples"] for s in shards)
        splits[f"{split}_tokens"] = sum(s["tokens"] for s in shards)
    return {"name": Path(data_dir).resolve().name, "path": str(Path(data_dir).resolve()),
            "genome": manifest.source.get("name", ""),
            "genome_sha256": manifest.source.get("sha256", ""),
            "manifest_checksum": manifest.checksum(),
            "npmi_table_sha256": manifest.npmi_table_sha256, "k": manifest.k,
            "min_count": manifest.params.get("min_count"), **splits}


def _schedule(info: dict) -> str:
    """The masking schedule in words: the schedule's own description (the trainer puts it into
    info["curriculum"]), then its switch."""
    c = info.get("curriculum", {})
    text = c.get("description") or f"masking schedule {c.get('mode', info.get('mode', ''))}"
    events = c.get("events") or []
    if events:
        e = events[0]
        text += f". Switched {e['from']} -> {e['to']} at step {e['step']}"
    elif c.get("mode", info.get("mode")) == CM_GEMS:
        text += ". No switch happened"
    return text + "."


def _evaluation(info: dict) -> str:
    ev = info.get("evaluation")
    if not ev:
        return "No validation evaluation was run."
    return (f"At step {ev['step']}: perplexity {ev['ppl_ref']:.3f} under the reference masking "
            f"(random k-spans, centre probability 0.025: the same for every run, so runs "
            f"compare), {ev['ppl']:.3f} under the run's frozen evaluation masking.")


def render(info: dict, config: BertConfig) -> str:
    """The model card (Markdown, with the Hugging Face metadata header)."""
    data = info.get("data", {})
    k = info.get("k", data.get("k", 6))
    params = info.get("n_params")
    run = info.get("mlflow_run_id")
    arch = (f"BertForMaskedLM ({info.get('model', 'bert')}): {config.num_hidden_layers} layers, "
            f"hidden size {config.hidden_size}, {config.num_attention_heads} attention heads, "
            f"feed-forward {config.intermediate_size}, {config.max_position_embeddings} positions"
            + (f", {params:,} parameters" if params else "")
            + f"; vocabulary of {config.vocab_size} ids: [PAD] [UNK] [CLS] [SEP] [MASK] and every "
            f"{k}-mer (DNABERT's vocab.txt order).")
    example = "ATGCGTACGTTAGC" + "[MASK]" + "GATCGATCGATTACAGG"
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: fill-mask",
        "tags: [dna, genomics, kmer, masked-language-modeling, cmgems]",
        "---",
        "",
        f"# {info.get('run_name', 'cmgems model')}",
        "",
        f"A DNA language model pretrained with cmgems on overlapping {k}-mer tokens.",
        "",
        "## Model",
        "",
        arch,
        "",
        "## Data",
        "",
        f"- genome: `{data.get('genome', '?')}`, sha256 `{data.get('genome_sha256', '?')}`",
        f"- dataset: `{data.get('name', '?')}` (manifest checksum "
        f"`{data.get('manifest_checksum', '?')}`), NPMI table sha256 "
        f"`{data.get('npmi_table_sha256', '?')}`",
        f"- {data.get('train_samples', '?'):,} training samples ({data.get('train_tokens', '?'):,}"
        f" tokens), {data.get('valid_samples', '?'):,} validation samples "
        f"({data.get('valid_tokens', '?'):,} tokens)" if data else "- (no dataset recorded)",
        "",
        "## Training",
        "",
        f"- steps: {info.get('step')} of {info.get('max_steps', info.get('step'))}, blocks of "
        f"{info.get('max_length', '?')} tokens, seed {info.get('seed', '?')}",
        f"- masking schedule: {_schedule(info)}",
        f"- reference perplexity: {_evaluation(info)}",
        f"- MLflow run: `{run}`" if run else "- MLflow run: none (tracking was unavailable)",
        "",
        "## How to load",
        "",
        "```python",
        "from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline",
        "",
        'tokenizer = AutoTokenizer.from_pretrained(EXPORT, trust_remote_code=True)',
        "model = AutoModelForMaskedLM.from_pretrained(EXPORT)",
        f'tokenizer("{example.replace("[MASK]", "")}")   # raw DNA, any case',
        'fill = pipeline("fill-mask", model=EXPORT, trust_remote_code=True)',
        f'fill("{example}")   # [MASK] stands for one {k}-mer',
        "```",
        "",
        "`trust_remote_code=True` loads the tokenizer in `tokenizer.py` here (numpy and "
        "transformers only, cmgems need not be installed). It reads raw nucleotides (N and other "
        f"IUPAC codes give [UNK] {k}-mers, as in training) and space-separated overlapping "
        f"{k}-mer text alike, and refuses anything else (ValueError) rather than answering junk. "
        "Without `trust_remote_code`, AutoTokenizer gives transformers' BertTokenizer on "
        f"`vocab.txt`: right for upper-case {k}-mer text, but a raw sequence becomes a single "
        "[UNK].",
        "",
        "DNABERT-2's `finetune/train.py` (it loads tokenizer and model with "
        "`trust_remote_code=True`):",
        "",
        "```",
        f"python train.py --model_name_or_path EXPORT --data_path DATA --kmer {k} "
        "--model_max_length 512 ...",
        "```",
        "",
        f"`--kmer {k}` turns each sequence into {k}-mer text first; its default `--kmer -1` "
        "passes the raw sequences, which this tokenizer splits into the same overlapping "
        f"{k}-mers itself: both give the same input ids. (A `--kmer` other than {k} gives "
        "words this tokenizer refuses.) Sequence pairs get [CLS] a [SEP] b [SEP].",
        "",
        "In MLflow (when the run logged it): `mlflow.transformers.load_model(MODEL_URI)` gives "
        "the fill-mask pipeline with this tokenizer.",
        "",
    ]
    return "\n".join(lines)

