"""What an export says about itself: the figures of its dataset, and its model card (README.md).

The card is written from the export's cmgems.json content (`info`, as the trainer makes it) and
the model's BertConfig: architecture, data with its checksums, steps, masking schedule and switch
step, reference perplexity, how to load it (transformers, pipeline, MLflow, DNABERT's scripts),
and how to use it on a genome (cmgems embed, predict, score-variants).

Its metadata header is huggingface_hub's ModelCardData, checked by ModelCard when rendered, so
the Hub and MLflow read it: license (the user's choice; unspecified by default), datasets (the
genome file, its sha256 beside it), base_model (the model it was initialised from), and the
reference perplexity and any finetuning results as a model-index.
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


def summary(info: dict) -> str:
    """The card's summary in one paragraph (the model registry version's description)."""
    data = info.get("data") or {}
    ev = info.get("evaluation") or {}
    k = info.get("k", data.get("k", 6))
    text = (f"{info.get('model', 'BERT')} DNA language model on overlapping {k}-mer tokens, "
            f"pretrained with cmgems for {info.get('step', '?')} steps "
            f"({(info.get('curriculum') or {}).get('mode', info.get('mode', '?'))} masking)")
    if data.get("genome"):
        text += f" on {data['genome']} (sha256 {data.get('genome_sha256', '?')[:12]}...)"
    if ev.get("ppl_ref") is not None:
        text += f"; reference perplexity {ev['ppl_ref']:.3f} at step {ev['step']}"
    return text + "."


def _metadata(info: dict, license: str | None, base_model: str | None,
              results: list[dict]) -> str:
    """The YAML header, through huggingface_hub's ModelCardData."""
    from huggingface_hub import EvalResult, ModelCardData
    data = info.get("data") or {}
    genome = data.get("genome") or None
    evals = []
    ev = info.get("evaluation") or {}
    if ev.get("ppl_ref") is not None:
        for metric, value in (("reference perplexity", ev["ppl_ref"]),
                              ("perplexity under the run's evaluation masking", ev.get("ppl"))):
            if value is not None:
                evals.append(EvalResult(task_type="fill-mask", dataset_type="genome",
                                        dataset_name=genome or "validation split",
                                        metric_type="perplexity", metric_value=float(value),
                                        metric_name=metric))
    for r in results:
        evals.append(EvalResult(task_type=r.get("task", "text-classification"),
                                dataset_type=r.get("dataset_type", "dna-classification"),
                                dataset_name=r["dataset"], metric_type=r["metric"],
                                metric_value=float(r["value"]), metric_name=r.get("name")))
    card = ModelCardData(
        library_name="transformers", pipeline_tag="fill-mask",
        tags=["dna", "genomics", "kmer", "masked-language-modeling", "cmgems"],
        license=license or None, base_model=base_model or None,
        datasets=[genome] if genome else None,
        model_name=info.get("run_name", "cmgems model") if evals else None,
        eval_results=evals or None,
        genome_sha256=data.get("genome_sha256") or None)
    return card.to_yaml()


def render(info: dict, config: BertConfig, *, license: str | None = None,
           base_model: str | None = None, results: list[dict] | None = None) -> str:
    """The model card (Markdown, with the Hugging Face metadata header).

    license: of the weights, the user's choice (an SPDX id or a Hub license name; default
    info["license"], else unspecified); base_model: the model it was initialised from (default
    info["init_from"]); results: finetuning results for the model-index, each {"dataset",
    "metric", "value"} and optionally "task" (text-classification), "name"."""
    from huggingface_hub import ModelCard
    license = license or info.get("license") or None
    base_model = base_model or info.get("init_from") or None
    results = list(results or ())
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
    block = info.get("max_length")
    window = (min(block, config.max_position_embeddings) if isinstance(block, int)
              else config.max_position_embeddings) - 2
    lines = [
        "---",
        _metadata(info, license, base_model, results),
        "---",
        "",
        f"# {info.get('run_name', 'cmgems model')}",
        "",
        summary(info),
        "",
        f"License of the weights: {license or 'unspecified (the author chose none)'}."
        + (f" Initialised from `{base_model}`." if base_model else ""),
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
        "## Use on a genome",
        "",
        "```",
        "cmgems embed EXPORT --genome genome.fa --bed regions.bed --out embeddings.h5",
        "cmgems score-variants EXPORT --genome genome.fa --vcf variants.vcf --out scores.tsv",
        "cmgems predict FINETUNED --fasta sequences.fa --out predictions.tsv",
        "```",
        "",
        (f"Windows of {window} k-mer tokens by default (the blocks the model was trained on, "
         "less [CLS] and [SEP]); see cmgems' docs/use.md."),
        "",
    ]
    if results:
        lines[-1:-1] = ["## Finetuning results", "",
                        *(f"- {r['dataset']}: {r['metric']} {float(r['value']):.4f}"
                          for r in results), ""]
    text = "\n".join(lines)
    ModelCard(text, ignore_metadata_errors=False)  # the Hub's check of the header
    return text

