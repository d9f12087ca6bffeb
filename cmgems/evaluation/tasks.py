"""Classification task files -> token ids, and the GUE benchmark's task list.

Two input formats are read:

- DNABERT-2 / GUE CSV (`*.csv`): header `sequence,label`, raw nucleotides (A/C/G/T, N allowed and
  encoded as [UNK] k-mers), integer labels.
- GeneMask / DNABERT few-shot TSV (`*.tsv`): header `"sequence"<TAB>"label"` (quotes optional),
  each sequence a string of space-separated overlapping k-mers; the nucleotides are the first k-mer
  plus the last base of every following one.

Every sequence becomes [CLS] k-mer ids [SEP], at most `max_length` tokens in all. Longer ones are
cut to their first max_length - 2 k-mers (overflow="truncate", the count is logged and kept in
TaskData.truncated) or rejected (overflow="error"). Errors name the file and line.
"""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmgems.errors import InputError
from cmgems.data.tokens import CLS_ID, NUM_SPECIAL, PAD_ID, SEP_ID, UNK_ID, base_codes, kmer_codes

log = logging.getLogger(__name__)

OVERFLOW_MODES = ("truncate", "error")
_SPACE = ord(" ")
_ALLOWED = np.zeros(256, dtype=bool)
_ALLOWED[np.frombuffer(b"ACGTNacgtn", dtype=np.uint8)] = True


@dataclass
class TaskData:
    """Encoded examples of one file, in file order."""

    path: Path
    input_ids: np.ndarray  # [N, L] int32: [CLS] ids [SEP] then [PAD]; L = longest example
    lengths: np.ndarray  # [N] tokens of each example including [CLS] and [SEP]
    labels: np.ndarray  # [N] int64
    lines: np.ndarray  # [N] 1-based line of each example in its file, for error messages
    truncated: int = 0  # examples cut to max_length

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> "TaskData":
        idx = np.asarray(idx)
        width = int(self.lengths[idx].max()) if len(idx) else 0
        return TaskData(self.path, self.input_ids[idx, :width], self.lengths[idx], self.labels[idx],
                        self.lines[idx], 0)


def _rows(path: Path, delimiter: str) -> list[tuple[int, list[str]]]:
    """(line number, fields) of each non-empty row after the checked header."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    csv.field_size_limit(1 << 30)  # long genomic sequences exceed the 128 KiB default
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        fields = [h.strip().strip('"').lower() for h in header] if header else None
        if fields != ["sequence", "label"]:
            want = "sequence,label" if delimiter == "," else '"sequence"<TAB>"label"'
            raise InputError(f"{path}, line 1: header must be {want}, got {header!r}")
        rows = []
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != 2:
                raise InputError(f"{path}, line {reader.line_num}: expected 2 fields (sequence, "
                                 f"label), got {len(row)}")
            rows.append((reader.line_num, row))
    if not rows:
        raise InputError(f"{path}: no examples after the header")
    return rows


def kmer_text_to_sequence(text: str, k: int, where: str) -> str:
    """'AAACGG AACGGA ...' -> 'AAACGGA...'; checks spacing, k-mer length and overlaps (vectorized)."""
    b = np.frombuffer(text.strip().encode("ascii", "replace"), dtype=np.uint8)
    first_space = np.flatnonzero(b == _SPACE)
    got_k = int(first_space[0]) if first_space.size else len(b)
    if got_k != k:
        raise InputError(f"{where}: k-mers of length {got_k}, the model uses k={k}")
    if (len(b) + 1) % (k + 1):
        raise InputError(f"{where}: not a sequence of space-separated {k}-mers")
    grid = np.append(b, np.uint8(_SPACE)).reshape(-1, k + 1)
    if not (grid[:, k] == _SPACE).all():
        raise InputError(f"{where}: not a sequence of space-separated {k}-mers")
    toks = grid[:, :k]
    if len(toks) > 1 and not (toks[1:, :k - 1] == toks[:-1, 1:]).all():
        bad = int(np.flatnonzero((toks[1:, :k - 1] != toks[:-1, 1:]).any(axis=1))[0]) + 1
        raise InputError(f"{where}: k-mer {bad + 1} ({toks[bad].tobytes().decode()}) does not "
                         f"overlap the one before it by {k - 1} bases")
    return np.concatenate([toks[0], toks[1:, k - 1]]).tobytes().decode("ascii")


def read_examples(path: str | Path, k: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(nucleotide sequences, raw integer labels, line numbers) of a .csv or .tsv task file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv"):
        raise InputError(f"{path}: unknown task file type (expected .csv: GUE sequence,label; or "
                         f".tsv: few-shot k-mer text)")
    rows = _rows(path, "," if suffix == ".csv" else "\t")
    seqs, labels, lines = [], [], []
    for line, (seq, label) in rows:
        try:
            labels.append(int(label.strip()))
        except ValueError:
            raise InputError(f"{path}, line {line}: label {label!r} is not an integer") from None
        seq = seq.strip()
        if suffix == ".tsv":
            seq = kmer_text_to_sequence(seq, k, f"{path}, line {line}")
        seqs.append(seq)
        lines.append(line)
    return seqs, np.array(labels, dtype=np.int64), np.array(lines, dtype=np.int64)


def encode(seqs: list[str], k: int, max_length: int, overflow: str, path: Path,
           lines: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Padded [CLS] k-mer ids [SEP] rows for all sequences at once: one k-mer pass over the
    concatenation, then a gather that only takes k-mers lying wholly inside their own sequence."""
    if overflow not in OVERFLOW_MODES:
        raise ValueError(f"overflow must be one of {OVERFLOW_MODES}, got {overflow!r}")
    if max_length < 3:
        raise ValueError(f"max_length must be >= 3 ([CLS], one k-mer, [SEP]), got {max_length}")
    seq_len = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    buf = np.frombuffer("".join(seqs).encode("ascii", "replace"), dtype=np.uint8)
    bad = ~_ALLOWED[buf]
    starts = np.concatenate(([0], np.cumsum(seq_len)[:-1]))
    if bad.any():
        pos = int(np.flatnonzero(bad)[0])
        i = int(np.searchsorted(starts, pos, side="right") - 1)
        raise InputError(f"{path}, line {lines[i]}: symbol {chr(buf[pos])!r} at base "
                         f"{pos - starts[i] + 1} is not A/C/G/T/N")
    n_kmers = seq_len - k + 1
    if (n_kmers < 1).any():
        i = int(np.flatnonzero(n_kmers < 1)[0])
        raise InputError(f"{path}, line {lines[i]}: sequence of {seq_len[i]} bases is shorter "
                         f"than k={k}")
    keep = np.minimum(n_kmers, max_length - 2)
    over = n_kmers > keep
    if over.any() and overflow == "error":
        i = int(np.flatnonzero(over)[0])
        raise InputError(f"{path}, line {lines[i]}: {n_kmers[i] + 2} tokens exceed max_length "
                         f"{max_length} (use truncation or a larger max_length)")
    codes = kmer_codes(base_codes(buf), k)
    width = int(keep.max())
    col = np.arange(width)
    inside = col[None, :] < keep[:, None]
    gathered = codes[np.where(inside, starts[:, None] + col[None, :], 0)]
    ids = np.where(gathered >= 0, gathered + NUM_SPECIAL, UNK_ID)
    # int32 halves the memory of large GUE sets (covid: 77k x 512); batches become int64 later.
    out = np.full((len(seqs), width + 2), PAD_ID, dtype=np.int32)
    out[:, 1:width + 1] = np.where(inside, ids, PAD_ID)
    out[:, 0] = CLS_ID
    out[np.arange(len(seqs)), keep + 1] = SEP_ID
    truncated = int(over.sum())
    if truncated:
        log.warning("%s: %d of %d sequences truncated to max_length %d tokens", path, truncated,
                    len(seqs), max_length)
    return out, keep + 2, truncated


TASK_FILE_SUFFIXES = (".tsv", ".csv")  # few-shot k-mer text, GUE CSV


def task_file(folder: Path, stem: str) -> Path | None:
    """folder/stem.tsv or folder/stem.csv, whichever exists (the .tsv first), else None."""
    for suffix in TASK_FILE_SUFFIXES:
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


def load_task_file(path: str | Path, k: int, max_length: int = 512,
                   overflow: str = "truncate") -> TaskData:
    """Read and encode one task file (.csv or .tsv)."""
    path = Path(path)
    seqs, labels, lines = read_examples(path, k)
    ids, lengths, truncated = encode(seqs, k, max_length, overflow, path, lines)
    return TaskData(path, ids, lengths, labels, lines, truncated)


def num_labels(train: TaskData) -> int:
    """Class count C of a training file, whose labels must be exactly 0..C-1 (C >= 2)."""
    present = np.unique(train.labels)
    c = int(present.max()) + 1
    if present.min() < 0 or len(present) != c or c < 2:
        raise InputError(f"{train.path}: training labels must be 0..C-1 with C >= 2 and every "
                         f"class present, got {present.tolist()}")
    return c


def check_labels(data: TaskData, classes: int, train_path: Path) -> None:
    """Every label of an evaluation file must be one the training file defines."""
    bad = (data.labels < 0) | (data.labels >= classes)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(f"{data.path}, line {data.lines[i]}: unknown label {data.labels[i]} "
                         f"({train_path} defines 0..{classes - 1})")


@dataclass(frozen=True)
class GueTask:
    """One GUE task with the finetuning settings for DNABERT (k-mer) models of DNABERT-2's
    finetune/scripts/run_dnabert1.sh and of CM-GEMS' GUE script (all: AdamW lr 3e-5, weight decay
    0.01, linear decay, fp16, seed 42, the checkpoint of lowest dev loss). Both run a global batch
    of 32 per optimizer step (DNABERT-2: 4 GPUs x 8; CM-GEMS: 2 GPUs x 8 x accumulation 2); here
    one device accumulates 4 micro-batches of 8. virus/covid accumulates more in both scripts
    (CM-GEMS: 2 x 8 x 4 = 64; DNABERT-2: 4 x 8 x 4 = 128): cmgems follows CM-GEMS, 8 x 8.
    warmup_steps and eval_steps count optimizer steps, as in the Hugging Face Trainer the scripts
    use. fp16 becomes precision "auto": bf16 where the GPU has it, else fp32 (cmgems.precision:
    fp16 only on request)."""

    name: str  # path under the GUE root, e.g. "EMP/H3"
    human: bool  # counted in the human mean (prom, tf, splice) or the non-human one
    max_length: int  # tokenizer model_max_length, [CLS] and [SEP] included
    epochs: int
    warmup_steps: int = 50
    eval_steps: int = 200  # dev evaluation interval (optimizer steps)
    batch_size: int = 8
    grad_accum: int = 4  # 8 x 4 = 32 examples per optimizer step
    lr: float = 3e-5
    max_steps: int | None = None  # overrides epochs when set (Hugging Face Trainer semantics)
    precision: str = "auto"

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum


GUE_TASKS: tuple[GueTask, ...] = (
    *(GueTask(f"EMP/{m}", False, 512, 3) for m in
      ("H3", "H3K14ac", "H3K36me3", "H3K4me1", "H3K4me2", "H3K4me3", "H3K79me3", "H3K9ac", "H4",
       "H4ac")),
    *(GueTask(f"mouse/{i}", False, 110, 5, warmup_steps=30, max_steps=1000) for i in range(5)),
    GueTask("prom/prom_300_all", True, 310, 4, eval_steps=400),
    GueTask("prom/prom_300_notata", True, 310, 4, eval_steps=400),
    GueTask("prom/prom_300_tata", True, 310, 10),
    GueTask("prom/prom_core_all", True, 80, 4, eval_steps=400),
    GueTask("prom/prom_core_notata", True, 80, 4, eval_steps=400),
    GueTask("prom/prom_core_tata", True, 80, 10),
    GueTask("splice/reconstructed", True, 410, 5),
    *(GueTask(f"tf/{i}", True, 110, 3, warmup_steps=30) for i in range(5)),
    GueTask("virus/covid", False, 1024, 9, grad_accum=8),
)
# The task the papers' GUE averages leave out (DNABERT-2's and CM-GEMS' means over 27 tasks):
# gue.md's non-human mean and gue-compare's means and test leave it out too by default.
LEFT_OUT_OF_PAPER_MEANS = ("virus/covid",)

GUE_FILES = ("train.csv", "dev.csv", "test.csv")


def discover_gue_tasks(root: str | Path) -> list[GueTask]:
    """The GUE tasks present under root (folders holding train.csv), in GUE_TASKS order."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: GUE root is not a directory")
    found = []
    for task in GUE_TASKS:
        d = root / task.name
        if not d.is_dir():
            continue
        missing = [f for f in GUE_FILES if not (d / f).is_file()]
        if missing:
            raise InputError(f"{d}: task folder lacks {', '.join(missing)}")
        found.append(task)
    if not found:
        raise InputError(f"{root}: no GUE task folders found "
                         f"(expected e.g. {root}/EMP/H3/train.csv)")
    return found
