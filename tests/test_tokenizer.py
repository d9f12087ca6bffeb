"""The DNA tokenizer: raw nucleotides and k-mer text to the training ids, refusals of what it cannot
read, and the export that carries it (AutoTokenizer with and without trust_remote_code, a process
without cmgems, pipeline("fill-mask"), DNABERT-2's finetune conventions)."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig

from conftest import run_module
from cmgems.model import tokenizer as tokenizer_module
from cmgems.data import tokens
from cmgems.model.card import render
from cmgems.model.architectures import export
from cmgems.model.tokenizer import DNAKmerTokenizer, kmer_vocab


def random_dna(rng, n: int, symbols="ACGTacgtNnRY-", p=None) -> str:
    p = p or [.2, .2, .2, .2, .03, .03, .03, .03, .02, .01, .02, .02, .01]
    return "".join(rng.choice(list(symbols), n, p=p))


@pytest.mark.parametrize("k", [3, 4, 5, 6])
def test_ids_are_the_training_ids(k):
    """Raw DNA in any case, with N and other IUPAC codes, gives exactly cmgems.tokens' ids (the
    shards' encoding), and its k-mer text gives the same."""
    rng = np.random.default_rng(k)
    tok = DNAKmerTokenizer(k=k)
    assert kmer_vocab(k) == tokens.vocab(k) and tok.vocab_size == tokens.vocab_size(k)
    seq = random_dna(rng, 300)
    want = [tokens.CLS_ID, *tokens.kmer_ids(seq, k).tolist(), tokens.SEP_ID]
    assert tok(seq)["input_ids"] == want
    assert tok(seq.lower())["input_ids"] == want
    assert tok(tokens.kmerize(seq, k))["input_ids"] == want
    assert tok(tokens.kmerize(seq.upper(), k).lower())["input_ids"] == want


def test_special_tokens_split_the_pieces():
    tok = DNAKmerTokenizer(k=6)
    ids = tok("ACGTACGT[MASK]ttgacaNN")["input_ids"]
    want = ([tokens.CLS_ID] + tokens.kmer_ids("ACGTACGT", 6).tolist() + [tokens.MASK_ID]
            + tokens.kmer_ids("TTGACANN", 6).tolist() + [tokens.SEP_ID])
    assert ids == want
    assert tok("ACGTAC CGTACG [MASK] TACGTA")["input_ids"][3] == tokens.MASK_ID
    pair = tok("ACGTACG", "TTTTTTT")
    assert pair["input_ids"] == [2, *tokens.kmer_ids("ACGTACG", 6), 3,
                                 *tokens.kmer_ids("TTTTTTT", 6), 3]
    assert pair["token_type_ids"] == [0] * 4 + [1] * 3
    assert tok.decode(tok("ACGTACG")["input_ids"], skip_special_tokens=True) == "ACGTACG"


@pytest.mark.parametrize("k", [3, 6])
def test_decode_gives_dna(k):
    """Overlapping k-mers decode to the bases they spell, [UNK] k-mers (N, IUPAC codes) included:
    bases no known k-mer covers come back as N, every other base as it was."""
    rng = np.random.default_rng(10 + k)
    tok = DNAKmerTokenizer(k=k)
    seq = random_dna(rng, 200, "ACGTNR", [.24, .24, .24, .24, .02, .02]).upper()
    ids = tok(seq)["input_ids"]
    want = seq.replace("R", "N")
    # a base is lost only where every k-mer covering it holds an unknown base: oracle by loop
    known = [all(c in "ACGT" for c in seq[i:i + k]) for i in range(len(seq) - k + 1)]
    want = "".join(c if any(known[j] for j in range(max(0, i - k + 1), min(i, len(known) - 1) + 1))
                   else "N" for i, c in enumerate(want))
    assert tok.decode(ids, skip_special_tokens=True) == want
    assert tok.decode(ids) == f"[CLS] {want} [SEP]"
    assert tok.decode(tok(tokens.kmerize(seq[:40], k))["input_ids"][1:-1]) == \
        tok.decode(tok(seq[:40])["input_ids"][1:-1])
    # fill-mask's answer: the masked k-mer's prediction read as the position it stands at
    left, right = "ACGTACGT", "TTGACATT"
    filled = [*tok(left)["input_ids"][1:-1], tok.convert_tokens_to_ids("G" * k),
              *tok(right)["input_ids"][1:-1]]
    assert tok.decode(filled) == left + "G" + "".join(right[i + k - 1]
                                                      for i in range(len(right) - k + 1))


def test_long_sequences_are_cut_to_the_model_unless_asked_not_to():
    tok = DNAKmerTokenizer(k=6)
    assert tok.model_max_length == 512
    seq = "ACGTTGCA" * 100
    assert tok(seq, return_tensors="pt")["input_ids"].shape == (1, 512)
    assert tok(seq, return_tensors="pt")["input_ids"][0, -1] == tokens.SEP_ID
    assert len(tok(seq, truncation=True)["input_ids"]) == 512
    assert len(tok(seq)["input_ids"]) == len(seq) - 5 + 2  # ids, not tensors: whole
    assert tok(seq, return_tensors="pt", truncation=False)["input_ids"].shape[1] == len(seq) - 3
    short = DNAKmerTokenizer(k=6, model_max_length=64)
    assert short(seq, return_tensors="pt")["input_ids"].shape == (1, 64)


def test_a_short_flank_beside_mask_says_how_long_it_must_be():
    with pytest.raises(ValueError, match=r"'ACG' of 3 bases.*each side of a \[MASK\] needs at "
                                         r"least 6 bases"):
        DNAKmerTokenizer(k=6)("ACG[MASK]ACGTACGT")


@pytest.mark.parametrize("text, message", [
    ("The quick brown fox", r"words of \[3, 5\] letters"),
    ("hello", r"'e' at position 2 is not a nucleotide"),
    ("ACGT1ACGT", r"'1' at position 5"),
    ("ACGTÄCGTAA", r"'Ä' at position 5"),
    ("ACGT", r"4 bases is shorter than one k-mer"),
    ("ACGTACGT[MASK]ACG", r"3 bases is shorter"),
    ("", r"empty sequence"),
    ("   ", r"empty sequence"),
    ("ACGTAC TTTTTT", r"k-mers 1 and 2 \('ACGTAC', 'TTTTTT'\) do not overlap by 5 bases"),
    ("ACGTAC CGT", r"words of \[3, 6\] letters"),
    ("ACGTACGTAC\nGTACGTTT", r"a raw sequence has no spaces"),
])
def test_unreadable_text_is_refused(text, message):
    with pytest.raises(ValueError, match=message):
        DNAKmerTokenizer(k=6)(text)


def test_vocab_file_is_checked(tmp_path):
    bad = tmp_path / "vocab.txt"
    bad.write_text("\n".join(tokens.vocab(6)[::-1]) + "\n")
    with pytest.raises(ValueError, match="not a k-mer vocabulary"):
        DNAKmerTokenizer(vocab_file=str(bad))
    tokens.write_vocab(bad, 4)
    assert DNAKmerTokenizer(vocab_file=str(bad)).k == 4


def test_long_sequence_gives_the_training_ids():
    seq = random_dna(np.random.default_rng(0), 200_000)
    tok = DNAKmerTokenizer(k=6)
    ids = tok(seq, add_special_tokens=False)["input_ids"]
    assert ids == tokens.kmer_ids(seq, 6).tolist()


# ---------------------------------------------------------------------- the export
def tiny_config(k: int = 6) -> BertConfig:
    return BertConfig(vocab_size=tokens.vocab_size(k), hidden_size=32, num_hidden_layers=1,
                      num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                      pad_token_id=tokens.PAD_ID)


INFO = {"run_name": "tiny", "step": 8, "max_steps": 8, "mode": "cm_gems", "model": "logo",
        "max_length": 128, "seed": 1, "mlflow_run_id": "abc123",
        "curriculum": {"mode": "cm_gems", "threshold": 1.0, "patience": 1, "min_switch_step": 0,
                       "switch_step": 4, "description": "CM-GEMS: GeneMask masking until ...",
                       "events": [{"step": 4, "from": "genemask",
                                                     "to": "global"}]},
        "evaluation": {"step": 8, "ppl": 12.5, "ppl_ref": 10.25, "stage": "global"},
        "data": {"name": "lambda", "genome": "lambda_phage.fa.gz", "genome_sha256": "f" * 64,
                 "manifest_checksum": "e" * 64, "npmi_table_sha256": "d" * 64, "k": 6,
                 "train_samples": 114, "train_tokens": 42743, "valid_samples": 13,
                 "valid_tokens": 5754}}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from transformers import BertForMaskedLM
    torch.manual_seed(0)
    config = tiny_config()
    out = tmp_path_factory.mktemp("export") / "export"
    export(BertForMaskedLM(config).state_dict(), config, out, INFO, render(INFO, config))
    return out


def test_export_files_come_from_save_pretrained(exported):
    config = json.loads((exported / "tokenizer_config.json").read_text())
    assert config["auto_map"]["AutoTokenizer"][0] == "tokenizer.DNAKmerTokenizer"
    assert config["tokenizer_class"] == "BertTokenizer" and config["do_lower_case"] is False
    assert config["model_max_length"] == 128 and config["k"] == 6
    assert (exported / "tokenizer.py").read_text() == Path(tokenizer_module.__file__).read_text()
    assert (exported / "vocab.txt").read_text().splitlines() == tokens.vocab(6)
    info = json.loads((exported / "cmgems.json").read_text())
    assert info["k"] == 6 and info["mlflow_run_id"] == "abc123"


def test_model_card_says_what_the_model_is(exported):
    from huggingface_hub import ModelCard
    card = (exported / "README.md").read_text()
    meta = ModelCard.load(exported / "README.md", ignore_metadata_errors=False).data.to_dict()
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "fill-mask"
    assert meta["datasets"] == ["lambda_phage.fa.gz"] and meta["genome_sha256"] == "f" * 64
    assert "license" not in meta and "base_model" not in meta
    (result,) = meta["model-index"][0]["results"]
    assert result["metrics"][0] == {"type": "perplexity", "value": 10.25,
                                    "name": "reference perplexity"}
    assert "License of the weights: unspecified" in card
    for fact in ("1 layers, hidden size 32", "f" * 64, "e" * 64, "114 training samples",
                 "steps: 8 of 8", "CM-GEMS: GeneMask masking until",
                 "Switched genemask -> global at step 4",
                 "perplexity 10.250 under the reference masking", "`abc123`",
                 "trust_remote_code=True", "--kmer 6", "--kmer -1", "cmgems embed EXPORT",
                 "Windows of 126 k-mer tokens"):
        assert fact in card, fact


def test_card_metadata_takes_license_base_model_and_finetuning_results():
    from huggingface_hub import ModelCard
    from cmgems.model.card import summary
    text = render(INFO, tiny_config(), license="cc-by-4.0", base_model="zhihan1996/DNA_bert_6",
                  results=[{"dataset": "prom-core", "metric": "accuracy", "value": 0.75}])
    meta = ModelCard(text, ignore_metadata_errors=False).data.to_dict()
    assert meta["license"] == "cc-by-4.0" and meta["base_model"] == "zhihan1996/DNA_bert_6"
    finetuned = meta["model-index"][0]["results"][1]
    assert finetuned["dataset"]["name"] == "prom-core"
    assert finetuned["metrics"] == [{"type": "accuracy", "value": 0.75}]
    assert "- prom-core: accuracy 0.7500" in text and summary(INFO) in text
    assert summary(INFO).startswith("logo DNA language model on overlapping 6-mer tokens")
    assert "reference perplexity 10.250 at step 8" in summary(INFO)
    # a run without evaluation or data still renders a valid card
    bare = render({"run_name": "x", "step": 1}, tiny_config())
    assert "model-index" not in ModelCard(bare).data.to_dict()


CLIENT = textwrap.dedent("""
    import json, sys
    sys.modules["cmgems"] = None          # a user's machine without cmgems
    from transformers import AutoTokenizer, AutoModelForMaskedLM, pipeline
    export = sys.argv[1]
    custom = AutoTokenizer.from_pretrained(export, trust_remote_code=True)
    plain = AutoTokenizer.from_pretrained(export)
    fill = pipeline("fill-mask", model=export, trust_remote_code=True)
    out = {"custom_class": type(custom).__name__, "plain_class": type(plain).__name__,
           "raw": custom("acgtacgNNacgt")["input_ids"],
           "kmer_text_plain": plain("ACGTAC CGTACG GTACGN")["input_ids"],
           "fill": fill("ACGTACGTAC[MASK]ACGTACGT", top_k=3)}
    try:
        fill("ACGTACGTAC")
    except Exception as e:
        out["no_mask"] = str(e)
    try:
        fill("ACGT[MASK]ACGTAC")
    except ValueError as e:
        out["too_short"] = str(e)
    features = pipeline("feature-extraction", model=export, trust_remote_code=True)
    vectors = features("ACGTTGCA" * 100)
    out["features"] = [len(vectors), len(vectors[0]), len(vectors[0][0])]
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_export_reads_dna_where_cmgems_is_not_installed(exported, tmp_path):
    res = run_module("-c", CLIENT, str(exported), cwd=tmp_path)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["custom_class"] == "DNAKmerTokenizer" and out["plain_class"] == "BertTokenizer"
    assert out["raw"] == [2, *tokens.kmer_ids("ACGTACGNNACGT", 6).tolist(), 3]
    assert out["kmer_text_plain"] == [2, *tokens.kmer_ids("ACGTACGN", 6).tolist(), 3]
    assert len(out["fill"]) == 3
    for guess in out["fill"]:
        assert len(guess["token_str"]) == 6 and set(guess["token_str"]) <= set("ACGT")
        # DNA: the left piece, the guess's last base, then one base per right k-mer
        assert guess["sequence"] == "ACGTACGTAC" + guess["token_str"][-1] + "CGT"
    assert "No mask_token" in out["no_mask"]
    assert "shorter than one k-mer" in out["too_short"]
    assert "each side of a [MASK] needs at least 6 bases" in out["too_short"]
    assert out["features"] == [1, 128, 32]  # 800 bases cut to the export's 128 positions


def test_dnabert2_train_py_conventions(exported):
    """As DNABERT-2's finetune/train.py loads and calls it: --kmer 6 (k-mer text) and its default
    --kmer -1 (raw sequences) give the same batch, sequence pairs included, and the classifier
    runs on it."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(exported), model_max_length=20, padding_side="right",
                                        use_fast=True, trust_remote_code=True)
    rng = np.random.default_rng(3)
    seqs = [random_dna(rng, n, "ACGTN", [.24, .24, .24, .24, .04]).upper() for n in (12, 40, 9)]

    def generate_kmer_str(sequence: str, k: int) -> str:  # train.py's k-mer text
        return " ".join(sequence[i:i + k] for i in range(len(sequence) - k + 1))

    def batch(texts):
        return tok(texts, return_tensors="pt", padding="longest",
                   max_length=tok.model_max_length, truncation=True)
    raw, kmer = batch(seqs), batch([generate_kmer_str(s, 6) for s in seqs])
    assert torch.equal(raw["input_ids"], kmer["input_ids"])
    assert raw["input_ids"].shape == (3, 20)  # 40 bases = 35 k-mers, cut to 18 + [CLS] [SEP]
    assert raw["input_ids"][1, -1] == tokens.SEP_ID
    assert raw["input_ids"][2].tolist()[:7] == [2, *tokens.kmer_ids(seqs[2], 6), 3, 0]
    pairs = batch([[seqs[0], seqs[2]]])
    assert pairs["input_ids"][0].tolist() == [2, *tokens.kmer_ids(seqs[0], 6), 3,
                                              *tokens.kmer_ids(seqs[2], 6), 3]
    model = AutoModelForSequenceClassification.from_pretrained(str(exported), num_labels=2,
                                                               trust_remote_code=True)
    attention = raw["input_ids"].ne(tok.pad_token_id)  # train.py's collator
    logits = model(input_ids=raw["input_ids"], attention_mask=attention).logits
    assert logits.shape == (3, 2) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="words of"):
        batch([generate_kmer_str(seqs[0], 3)])  # --kmer 3 on a 6-mer model: refused
