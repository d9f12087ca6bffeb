"""A k-mer tokenizer for DNA: raw nucleotides, or DNABERT's space-separated k-mer text, to the ids
cmgems models are trained on.

- A raw sequence (one word, any case) becomes its overlapping k-mers; a k-mer holding N, another
  IUPAC ambiguity code, U or a gap '-' becomes [UNK], exactly as the dataset shards encode it.
- K-mer text (words of k letters each, consecutive words overlapping by k - 1 bases, as DNABERT's
  scripts write it) gives the same ids as the raw sequence it spells.
- Anything else is refused with ValueError: a symbol that is no nucleotide, words of mixed
  lengths, k-mers that do not overlap, a sequence shorter than k, an empty text. A model fed any
  of those would answer junk without a word.
Special tokens ([MASK] for fill-mask, [SEP] ...) may stand between the pieces; each piece is read
on its own, so "ACGTAC[MASK]GTACGT" asks for one masked k-mer between two, and each piece needs
at least k bases.

Decoding gives DNA: the overlapping k-mers of a run of tokens spell one sequence (the first k-mer,
then one base per k-mer), so fill-mask's `sequence` is nucleotides. A base no known k-mer covers
([UNK] ones) is N; special tokens other than [UNK] stand as words of their own between the runs.
model_max_length defaults to 512 (DNABERT's positions, [CLS] and [SEP] included; an export sets
its model's). A call that asks for tensors (return_tensors, as every pipeline does) and says
nothing of truncation is cut to it, with a warning: tensors go to the model, which takes no more,
so feature-extraction and fill-mask take a long sequence instead of failing with a tensor size
mismatch. Lists of ids are not cut unless asked; `truncation=False` keeps every token, and
`cmgems embed` windows a long sequence instead of cutting it.

This file travels inside every export (tokenizer_config.json's auto_map names it), so that
`AutoTokenizer.from_pretrained(export, trust_remote_code=True)` works where cmgems is not
installed: it imports only numpy and transformers, and spells out the vocabulary that
cmgems.data.tokens defines for training (tests/test_tokenizer.py checks that the two agree).
"""
from __future__ import annotations

import itertools
import os

import numpy as np
from transformers import PreTrainedTokenizer
from transformers.utils import logging

log = logging.get_logger(__name__)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
ALPHABET = "ATCG"  # k-mer ids follow itertools.product(ALPHABET, repeat=k), as DNABERT's vocab.txt
K_RANGE = range(3, 7)
# IUPAC codes of uncertain bases, RNA's U and the alignment gap: read, as [UNK] k-mers.
UNKNOWN_BASES = "NRYSWKMBDHVU-"

_INVALID, _UNKNOWN = -2, -1
_CODE = np.full(256, _INVALID, dtype=np.int8)
for _i, _b in enumerate(ALPHABET):
    _CODE[ord(_b)] = _CODE[ord(_b.lower())] = _i
for _b in UNKNOWN_BASES:
    _CODE[ord(_b)] = _CODE[ord(_b.lower())] = _UNKNOWN

VOCAB_FILES_NAMES = {"vocab_file": "vocab.txt"}
MAX_POSITIONS = 512  # DNABERT's and cmgems' position embeddings


def kmer_vocab(k: int) -> list[str]:
    """Every token in id order: the specials, then all 4^k k-mers."""
    return list(SPECIAL_TOKENS) + ["".join(p) for p in itertools.product(ALPHABET, repeat=k)]


class DNAKmerTokenizer(PreTrainedTokenizer):
    """Overlapping k-mer tokens ([CLS] k-mers [SEP]) of raw DNA or of k-mer text.

    vocab_file: a vocab.txt in DNABERT's order (the export's); or k alone builds it.
    do_lower_case is stored for transformers' BertTokenizer, which reads the same export when it
    is loaded without trust_remote_code; this tokenizer reads every case itself.
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "token_type_ids", "attention_mask"]

    def __init__(self, vocab_file: str | None = None, k: int | None = None,
                 do_lower_case: bool = False, unk_token="[UNK]", sep_token="[SEP]",
                 pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]", **kwargs):
        if vocab_file is not None:
            with open(vocab_file, encoding="utf-8") as f:
                tokens = [line.rstrip("\n") for line in f if line.strip()]
            k = len(tokens[len(SPECIAL_TOKENS)]) if len(tokens) > len(SPECIAL_TOKENS) else None
            if k not in K_RANGE or tokens != kmer_vocab(k):
                raise ValueError(f"{vocab_file}: not a k-mer vocabulary (the specials "
                                 f"{', '.join(SPECIAL_TOKENS)}, then every k-mer of "
                                 f"{ALPHABET!r} in product order, k in 3..6)")
        elif k not in K_RANGE:
            raise ValueError(f"DNAKmerTokenizer: give vocab_file or k in 3..6, got k={k!r}")
        self.k = int(k)
        self._tokens = np.array(kmer_vocab(self.k), dtype=object)
        self._ids = {t: i for i, t in enumerate(self._tokens.tolist())}
        self._powers = 4 ** np.arange(self.k - 1, -1, -1, dtype=np.int64)
        kwargs.setdefault("model_max_length", MAX_POSITIONS)
        super().__init__(k=self.k, do_lower_case=do_lower_case, unk_token=unk_token,
                         sep_token=sep_token, pad_token=pad_token, cls_token=cls_token,
                         mask_token=mask_token, **kwargs)

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    def get_vocab(self) -> dict[str, int]:
        return {**self._ids, **self.added_tokens_encoder}

    def _convert_token_to_id(self, token: str) -> int:
        return self._ids.get(token, self._ids["[UNK]"])

    def _convert_id_to_token(self, index: int) -> str:
        return str(self._tokens[index]) if 0 <= index < len(self._tokens) else "[UNK]"

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return super().convert_tokens_to_ids(tokens)
        # dict.get mapped at C speed: this runs once per token of every text encoded
        lookup = self._ids if len(self.added_tokens_encoder) <= len(SPECIAL_TOKENS) else \
            self.get_vocab()
        return list(map(lookup.get, tokens, itertools.repeat(self._ids["[UNK]"])))

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        # [UNK] holds a place in the sequence (a k-mer of unknown bases): decoding without the
        # specials keeps it, or the bases after it would shift
        if skip_special_tokens and not isinstance(ids, int):
            drop = set(self.all_special_ids) - {self.unk_token_id}
            ids = [i for i in (ids.tolist() if hasattr(ids, "tolist") else ids)
                   if int(i) not in drop]
            skip_special_tokens = False
        return super().convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """DNA: each run of k-mer tokens as the sequence its overlapping k-mers spell, special
        tokens between runs as words of their own ([UNK] is a k-mer of unknown bases)."""
        words, run = [], []
        specials = set(self.all_special_tokens) - {str(self.unk_token)}
        for t in tokens:
            if t in specials:
                if run:
                    words.append(self._spell(run))
                    run = []
                words.append(t)
            else:
                run.append(t)
        if run:
            words.append(self._spell(run))
        return " ".join(words)

    def _spell(self, kmers: list[str]) -> str:
        """The bases of consecutive overlapping k-mers, vectorized: base j is taken from the
        first known k-mer covering it (so a clean run reads as its first k-mer plus the last
        base of each next one); a base only [UNK] k-mers cover is N."""
        k, n = self.k, len(kmers)
        known = np.array([len(t) == k and t in self._ids for t in kmers], dtype=bool)
        letters = np.frombuffer("".join(t if ok else "N" * k for t, ok in zip(kmers, known))
                                .encode("ascii"), dtype=np.uint8).reshape(n, k)
        out = np.full(n + k - 1, ord("N"), dtype=np.uint8)
        rows = np.flatnonzero(known)
        # k strided writes: base j gets offset j - r of k-mer r; the last write, the highest
        # offset, is the lowest r
        for offset in range(k):
            out[rows + offset] = letters[rows, offset]
        return out.tobytes().decode("ascii")

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None):
        name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        path = os.path.join(save_directory, name) if os.path.isdir(save_directory) \
            else save_directory
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(self._tokens.tolist()) + "\n")
        return (path,)

    # ------------------------------------------------------------------ reading DNA
    def __call__(self, *args, **kwargs):
        self._cutting = (kwargs.get("return_tensors") is not None
                         and kwargs.get("truncation") is None and kwargs.get("max_length") is None)
        if self._cutting:
            kwargs["truncation"] = True
        try:
            return super().__call__(*args, **kwargs)
        finally:
            self._cutting = False

    def tokenize(self, text: str, **kwargs) -> list[str]:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"DNAKmerTokenizer: empty sequence {text!r}")
        try:
            return super().tokenize(text, **kwargs)
        except _ShortPiece as e:
            if any(t in text for t in self.all_special_tokens):
                raise _ShortPiece(f"{e}; the pieces between special tokens are read on their "
                                  f"own, so each side of a [MASK] needs at least {self.k} bases "
                                  f"(one {self.k}-mer): give more flank, or write the "
                                  f"k-mers as k-mer text") from None
            raise

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        ids = self.encode_dna(text)
        if getattr(self, "_cutting", False) and len(ids) > self.model_max_length - 2:
            log.warning("DNAKmerTokenizer: %d k-mers cut to the model's %d (model_max_length "
                        "%d); pass truncation=False to keep them all, or embed long sequences "
                        "in windows (cmgems embed)", len(ids), self.model_max_length - 2,
                        self.model_max_length)
        return self._tokens[ids].tolist()

    def encode_dna(self, text: str) -> np.ndarray:
        """Token ids (no [CLS]/[SEP]) of one raw sequence or one k-mer text, vectorized."""
        words = text.split()
        if not words:
            return np.empty(0, dtype=np.int64)
        if len(words) == 1 and len(words[0]) != self.k:
            return self._raw_ids(words[0])
        lengths = {len(w) for w in words}
        if lengths != {self.k}:
            raise ValueError(f"DNAKmerTokenizer (k={self.k}): cannot read {_excerpt(text)}: "
                             f"words of {sorted(lengths)} letters; k-mer text has words of "
                             f"{self.k} letters, a raw sequence has no spaces")
        return self._kmer_text_ids(words, text)

    def _codes(self, word: str, text: str) -> np.ndarray:
        try:
            raw = word.encode("ascii")
        except UnicodeEncodeError as e:
            raise ValueError(self._bad_symbol(text, word[e.start])) from None
        codes = _CODE[np.frombuffer(raw, dtype=np.uint8)]
        bad = np.flatnonzero(codes == _INVALID)
        if len(bad):
            raise ValueError(self._bad_symbol(text, word[bad[0]]))
        return codes

    def _bad_symbol(self, text: str, symbol: str) -> str:
        return (f"DNAKmerTokenizer: cannot read {_excerpt(text)}: {symbol!r} at position "
                f"{text.index(symbol) + 1} is not a nucleotide (A, C, G, T, or {UNKNOWN_BASES} "
                f"read as unknown)")

    def _raw_ids(self, seq: str) -> np.ndarray:
        codes = self._codes(seq, seq).astype(np.int64)
        n = len(codes) - self.k + 1
        if n < 1:
            raise _ShortPiece(f"DNAKmerTokenizer (k={self.k}): sequence {seq!r} of {len(seq)} "
                              f"bases is shorter than one k-mer")
        unknown = codes < 0
        codes[unknown] = 0
        out = np.zeros(n, dtype=np.int64)
        for j in range(self.k):  # k shifted adds, each over every position at once
            out = (out << 2) | codes[j:j + n]
        bad = np.concatenate(([0], np.cumsum(unknown)))
        return np.where(bad[self.k:] - bad[:n] > 0, self._ids["[UNK]"],
                        out + len(SPECIAL_TOKENS))

    def _kmer_text_ids(self, words: list[str], text: str) -> np.ndarray:
        letters = "".join(words)
        codes = self._codes(letters, text).reshape(len(words), self.k).astype(np.int64)
        upper = np.frombuffer(letters.upper().encode("ascii"), dtype=np.uint8).reshape(codes.shape)
        apart = np.flatnonzero((upper[1:, :-1] != upper[:-1, 1:]).any(axis=1))
        if len(apart):
            i = int(apart[0])
            raise ValueError(f"DNAKmerTokenizer (k={self.k}): cannot read {_excerpt(text)}: "
                             f"k-mers {i + 1} and {i + 2} ({words[i]!r}, {words[i + 1]!r}) do "
                             f"not overlap by {self.k - 1} bases; give overlapping k-mers "
                             f"(DNABERT's format) or the raw sequence")
        ids = codes.clip(min=0) @ self._powers + len(SPECIAL_TOKENS)
        return np.where((codes < 0).any(axis=1), self._ids["[UNK]"], ids)

    # ------------------------------------------------------------------ model inputs
    # Written out (not transformers' special_tokens_pattern) so the file also works with the
    # transformers 4 releases a user of the export may have.
    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        cls, sep = [self.cls_token_id], [self.sep_token_id]
        if token_ids_1 is None:
            return cls + list(token_ids_0) + sep
        return cls + list(token_ids_0) + sep + list(token_ids_1) + sep

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None,
                                already_has_special_tokens=False):
        if already_has_special_tokens:
            special = set(self.all_special_ids)
            return [int(i in special) for i in token_ids_0]
        mask = [1] + [0] * len(token_ids_0) + [1]
        return mask if token_ids_1 is None else mask + [0] * len(token_ids_1) + [1]

    def create_token_type_ids_from_sequences(self, token_ids_0, token_ids_1=None):
        first = [0] * (len(token_ids_0) + 2)
        return first if token_ids_1 is None else first + [1] * (len(token_ids_1) + 1)


class _ShortPiece(ValueError):
    """A sequence shorter than one k-mer."""


def _excerpt(text: str, width: int = 40) -> str:
    return repr(text if len(text) <= width else text[:width] + "...")
