"""The k-mer vocabulary and vectorized nucleotide -> token encoding.

Ids are DNABERT's: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4, then every k-mer in the order of
itertools.product("ATCG", repeat=k). Coding A=0 T=1 C=2 G=3 makes a k-mer's base-4 number its
index in that product, so token id = NUM_SPECIAL + code, computed without strings.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(5)
NUM_SPECIAL = len(SPECIAL_TOKENS)
ALPHABET = "ATCG"
K_RANGE = range(3, 7)

# byte -> 2-bit code; -1 for anything that is not A/C/G/T in either case.
_CODE = np.full(256, -1, dtype=np.int8)
for _i, _b in enumerate(ALPHABET):
    _CODE[ord(_b)] = _i
    _CODE[ord(_b.lower())] = _i


def check_k(k: int) -> int:
    if k not in K_RANGE:
        raise ValueError(f"k must be in {K_RANGE.start}..{K_RANGE.stop - 1}, got {k}")
    return k


def vocab_size(k: int) -> int:
    return NUM_SPECIAL + 4 ** check_k(k)


def vocab(k: int) -> list[str]:
    """All tokens in id order (DNABERT's vocab.txt for this k)."""
    check_k(k)
    return list(SPECIAL_TOKENS) + ["".join(p) for p in itertools.product(ALPHABET, repeat=k)]


def write_vocab(path: str | Path, k: int) -> Path:
    path = Path(path)
    path.write_text("\n".join(vocab(k)) + "\n")
    return path


def k_from_vocab_size(size: int) -> int:
    for k in K_RANGE:
        if vocab_size(k) == size:
            return k
    raise ValueError(f"vocab size {size} matches no k-mer vocabulary (k in 3..6)")


def base_codes(seq: bytes | bytearray | memoryview | str | np.ndarray) -> np.ndarray:
    """2-bit code per base (int8), -1 where the symbol is not A/C/G/T (N, IUPAC, '-', ...)."""
    if isinstance(seq, str):
        seq = seq.encode("ascii", "replace")
    arr = seq if isinstance(seq, np.ndarray) else np.frombuffer(seq, dtype=np.uint8)
    return _CODE[arr]


def kmer_codes(codes: np.ndarray, k: int) -> np.ndarray:
    """Code (0..4^k-1) of the k-mer starting at each position; -1 where it holds a non-ACGT base.

    Length is len(codes) - k + 1 (empty when shorter than k).
    """
    check_k(k)
    n = len(codes) - k + 1
    if n <= 0:
        return np.empty(0, dtype=np.int64)
    c = codes.astype(np.int64)
    bad = c < 0
    c[bad] = 0
    out = np.zeros(n, dtype=np.int64)
    for j in range(k):  # k <= 6 shifted adds: vectorized over every position
        out = (out << 2) | c[j:j + n]
    badcount = np.concatenate(([0], np.cumsum(bad, dtype=np.int64)))
    out[(badcount[k:] - badcount[:n]) > 0] = -1
    return out


def kmer_ids(seq, k: int) -> np.ndarray:
    """Token id of every overlapping k-mer of seq; [UNK] where a k-mer holds a non-ACGT base."""
    codes = kmer_codes(base_codes(seq), k)
    return np.where(codes >= 0, codes + NUM_SPECIAL, UNK_ID).astype(np.int64)


def ids_to_kmers(ids, k: int) -> list[str]:
    table = vocab(k)
    return [table[int(i)] for i in ids]


def kmerize(seq: str, k: int) -> str:
    """Space-separated overlapping k-mers: the text form DNABERT's scripts feed its tokenizer."""
    return " ".join(seq[i:i + k] for i in range(len(seq) - k + 1))
