"""Vocabulary ids and the vectorized k-mer encoders against string-based references."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from cmgems.data import tokens
from preprocessing import kmers


def test_vocab_matches_dnabert_order():
    v = tokens.vocab(6)
    assert len(v) == 4101 == tokens.vocab_size(6)
    assert v[:8] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "AAAAAA", "AAAAAT", "AAAAAC"]
    assert v[5:] == ["".join(p) for p in itertools.product("ATCG", repeat=6)]
    assert v[-1] == "GGGGGG"
    for k in (3, 4, 5):
        assert len(tokens.vocab(k)) == 5 + 4 ** k
        assert tokens.k_from_vocab_size(5 + 4 ** k) == k


def test_vocab_file_round_trip(tmp_path):
    path = tokens.write_vocab(tmp_path / "vocab.txt", 6)
    assert path.read_text().splitlines() == tokens.vocab(6)


@pytest.mark.parametrize("k", [3, 4, 6])
def test_kmer_ids_equal_string_lookup(k):
    rng = np.random.default_rng(k)
    seq = "".join(rng.choice(list("ACGTacgtNRY-"), 400, p=[.18] * 4 + [.02] * 4 + [.05] * 4))
    index = {kmer: i for i, kmer in enumerate(tokens.vocab(k))}
    want = [index.get(seq[i:i + k].upper(), tokens.UNK_ID) for i in range(len(seq) - k + 1)]
    assert tokens.kmer_ids(seq, k).tolist() == want


@pytest.mark.parametrize("k", [3, 5, 6])
def test_fast_windows_agree_with_tokens(k):
    rng = np.random.default_rng(10 + k)
    seq = "".join(rng.choice(list("ACGTNacgt"), 2000, p=[.2, .2, .2, .2, .04, .04, .04, .04, .04]))
    code, vlen = kmers.windows(kmers.encode(seq.encode()), k)
    ref = tokens.kmer_codes(tokens.base_codes(seq), k)
    full = vlen == k
    assert np.array_equal(np.flatnonzero(full), np.flatnonzero(ref >= 0))
    assert np.array_equal(code[full].astype(np.int64), ref[ref >= 0])
    # vlen: ACGT bases from i before a non-ACGT symbol or the end, capped at k
    for i in rng.integers(0, len(seq), 200):
        run = 0
        while run < k and i + run < len(seq) and seq[i + run].upper() in "ACGT":
            run += 1
        assert vlen[i] == run


def test_bert_tokenizer_from_our_vocab_gives_our_ids(tmp_path):
    transformers = pytest.importorskip("transformers")
    tokens.write_vocab(tmp_path / "vocab.txt", 6)
    tok = transformers.BertTokenizerFast(vocab=str(tmp_path / "vocab.txt"),
                                             do_lower_case=False)
    seq = "ACGTTGCAAGGCTTAN"
    ids = tok(tokens.kmerize(seq, 6))["input_ids"]
    assert ids == [tokens.CLS_ID] + tokens.kmer_ids(seq, 6).tolist() + [tokens.SEP_ID]
