"""Writing a dataset directory: the parts `build` and the job-array stages (preprocessing.array)
share, so that both write the same bytes and refuse the same things in the same words.

  Summary                  the closing summary, also the manifest's stats
  ShardWriter, SplitShards one split's samples -> shards or fragments of shards, in this process
                           (the array's shard stage; build's workers write theirs in place,
                           preprocessing.shard_plan)
  dataset_manifest         the manifest of a finished dataset
  check_writable, genome_sha256, warn_if_unscored, check_valid_records, check_train_samples
                           the checks both make, in the same words
The output directory itself (lock, staging, publish, interrupts): preprocessing.output_dir.
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Iterable

import numpy as np

from cmgems.errors import InputError
from cmgems.io import sha256_file
from cmgems.data.npmi_table import scored_fraction
from cmgems.data.layout import SPLITS, shard_name
from cmgems.data.shards import NPMI_DTYPE, Manifest, write_shard
from cmgems.data.tokens import vocab_size

from . import samples
from .fasta import ReadStats, check_genome_file

# Below this share of scored k-mers, PMI masking (genemask, global, cm_gems) mostly masks ties
# of unscored k-mers: the build says so. The trainer refuses PMI strategies below its own
# configurable bound, read from the manifest's stats.npmi_scored_fraction.
WARN_SCORED_FRACTION = 0.5

log = logging.getLogger("cmgems.preprocessing")


def check_writable(path: Path, what: str) -> None:
    """Refuse up front (not after the work) a file that cannot be written: its directory is
    missing, not a directory or read-only (tried by creating a file: permission bits do not
    tell for root or a read-only mount), or the path is a directory."""
    parent = path.absolute().parent
    if path.is_dir():
        raise InputError(f"{path}: cannot write the {what} (it is a directory)")
    if not parent.is_dir():
        raise InputError(f"{path}: cannot write the {what} (directory {parent} "
                         f"{'is a file' if parent.exists() else 'does not exist'})")
    probe = parent / f".tmp-{os.getpid()}-probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"{path}: cannot write the {what} ({e.strerror or e})") from None


def genome_sha256(genome: Path) -> str:
    check_genome_file(genome)       # a named pipe would hang here
    try:
        return sha256_file(genome)
    except OSError as e:
        raise InputError(f"{genome}: cannot read genome ({e.strerror or e})") from None


@dataclass
class Summary:
    """The closing summary (also the manifest's stats)."""
    READER_FIELDS: ClassVar[tuple[str, ...]] = (
        "records", "empty_records", "short_records", "bases", "bases_short_records")

    records: int = 0
    empty_records: int = 0
    short_records: int = 0
    bases: int = 0
    bases_short_records: int = 0
    bases_non_acgt: int = 0
    tokens_dropped: int = 0
    samples: dict = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    tokens: dict = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    shards: int = 0
    seconds: float = 0.0

    def read(self, st: ReadStats) -> None:
        """Take what the FASTA reader saw (complete once it has been read to the end)."""
        self.records, self.bases = st.records, st.bases
        self.empty_records, self.short_records = st.empty_records, st.short_records
        self.bases_short_records = st.short_record_bases

    def reader_fields(self) -> dict:
        return {key: getattr(self, key) for key in self.READER_FIELDS}

    def add_cuts(self, stats: dict) -> None:
        """Add SplitShards.stats() (of the whole genome or of one run of its pieces)."""
        self.bases_non_acgt += stats["non_acgt"]
        self.tokens_dropped += stats["dropped"]
        for split in SPLITS:
            self.samples[split] += stats["samples"][split]
            self.tokens[split] += stats["tokens"][split]

    def lines(self) -> list[str]:
        used = self.bases - self.bases_short_records - self.bases_non_acgt
        mbps = self.bases / self.seconds / 1e6 if self.seconds else 0.0
        return [
            f"records: {self.records} ({self.empty_records} empty and {self.short_records} "
            f"shorter than one sample skipped)",
            f"bases: {self.bases:,} read, {used:,} used; skipped: {self.bases_non_acgt:,} "
            f"non-ACGT, {self.bases_short_records:,} in short records, "
            f"{self.tokens_dropped:,} k-mers in ACGT fragments under {samples.MIN_TOKENS} tokens",
            f"samples: {self.samples['train']:,} train, {self.samples['valid']:,} valid; "
            f"tokens: {self.tokens['train']:,} train, {self.tokens['valid']:,} valid; "
            f"shards: {self.shards}",
            f"time: {self.seconds:.2f} s ({mbps:.1f} Mbp/s)",
        ]


def warn_if_unscored(table: np.ndarray, where: Path | str, min_count: int | None,
                     source: str) -> float:
    """Warn when few k-mers are scored (a genome too small for --min-count, a table of NaN);
    returns the scored fraction."""
    frac = scored_fraction(table)
    if frac >= WARN_SCORED_FRACTION:
        return frac
    n, k = int(np.count_nonzero(~np.isnan(table))), round(np.log(len(table)) / np.log(4))
    why = (f"{source} is too small for --min-count {min_count} (k-mers seen fewer times get no "
           f"score); lower --min-count or pass --npmi-table" if min_count is not None else
           f"the table {source} leaves the others empty or NaN")
    what = (f"NO k-mer is scored (0 of {len(table)} {k}-mers)" if n == 0 else
            f"only {n} of {len(table)} {k}-mers scored ({100 * frac:.1f}%)")
    log.warning("%s: %s: %s. PMI masking strategies (genemask, global, cm_gems) would mask "
                "mostly by ties on this dataset", where, what, why)
    return frac


def check_valid_records(genome: Path, wanted: Iterable[str], names: list[str]) -> None:
    """Refuse --valid-records naming a record the genome does not hold."""
    missing = sorted(set(wanted) - set(names))
    if missing:
        raise InputError(f"--valid-records: {', '.join(missing)} not found in {genome} "
                         f"(records: {', '.join(names[:10])}{' ...' if len(names) > 10 else ''})")


def check_train_samples(genome: Path, min_bases: int, summary: Summary) -> None:
    if not summary.samples["train"]:
        raise InputError(f"{genome}: no training samples (no ACGT stretch of "
                         f"{min_bases}+ bases outside the validation split)")


# ---- shards ----

def shard_attrs(k: int, npmi_table_sha256: str, source_sha256: str, seed: int) -> dict:
    """The attributes of every shard of a dataset (split aside)."""
    return {"k": k, "vocab_size": vocab_size(k), "npmi_table_sha256": npmi_table_sha256,
            "source_sha256": source_sha256, "seed": seed}


def _ending(ends: np.ndarray, reach: int) -> int | None:
    """How many samples (cumulative token counts `ends`) a shard takes that must reach `reach`
    tokens: it ends with the sample that reaches them; None if none does."""
    i = int(np.searchsorted(ends, reach))
    return i + 1 if i < len(ends) else None


def shard_ends(lengths: np.ndarray, shard_tokens: int) -> np.ndarray:
    """End (exclusive sample index) of each shard a ShardWriter without a plan makes of samples
    of these lengths: a shard ends with the sample that reaches shard_tokens; the last one takes
    the rest."""
    ends = np.cumsum(lengths, dtype=np.int64)
    out, start = [], 0
    while (k := _ending(ends, start + shard_tokens)) is not None:
        out.append(k)
        start = int(ends[k - 1])
    if len(ends) > (out[-1] if out else 0):
        out.append(len(ends))
    return np.array(out, dtype=np.int64)


class ShardWriter:
    """Collects the samples of one split and writes them as shards {split}-NNNNN.h5.

    Tokens are compressed straight out of the arena slot into a preallocated buffer (one copy,
    no concatenation). Without `shard_end` a shard ends after the sample that reaches
    shard_tokens and close() writes the rest (build). With `shard_end` (the job array's plan:
    the end of each shard in sample numbers across the split) the writer gets the split's
    samples from number `first` on, up to some later one: the shards lying wholly among them are
    written as build writes them, and the parts of the (at most two) shards reaching beyond them
    as fragments part-GROUP-{split}-NNNNN.h5 (listed in `fragments`) for cmgems.data.shards.merge.
    """

    def __init__(self, directory: Path, split: str, attrs: dict, shard_tokens: int,
                 piece_tokens: int, shard_end: np.ndarray | None = None, first: int = 0,
                 group: int = 0):
        self.directory, self.split, self.attrs = directory, split, attrs
        self.shard_tokens, self.shard_end, self.group = shard_tokens, shard_end, group
        self.s0 = self.first = self.next = first   # numbers of the first buffered, next sample
        self.shard = 0 if shard_end is None else int(np.searchsorted(shard_end, first, "right"))
        # a shard holds < shard_tokens + MAX_TOKENS tokens; np.empty: pages touched only if used
        capacity = shard_tokens + samples.MAX_TOKENS + piece_tokens
        self.tokens = np.empty(capacity, np.uint16)
        self.npmi = np.empty(capacity, NPMI_DTYPE)
        self.lengths: list[np.ndarray] = []
        self.n = 0
        self.entries: list[dict] = []
        self.fragments: list[dict] = []

    def add(self, tokens: np.ndarray, npmi_: np.ndarray, token_mask: np.ndarray,
            lengths: np.ndarray) -> None:
        m = int(lengths.sum())
        if not m:
            return
        np.compress(token_mask, tokens, out=self.tokens[self.n:self.n + m])
        np.compress(token_mask, npmi_, out=self.npmi[self.n:self.n + m])
        self.lengths.append(lengths.astype(np.int64))   # a copy: the slot is reused
        self.n += m
        self.next += len(lengths)
        while (k := self._due()) is not None:
            self._flush(k)

    def _due(self) -> int | None:
        """How many buffered samples complete the current shard, None if they do not yet."""
        if self.shard_end is None:
            if self.n < self.shard_tokens:
                return None
            return _ending(np.cumsum(np.concatenate(self.lengths)), self.shard_tokens)
        if self.shard < len(self.shard_end) and self.shard_end[self.shard] <= self.next:
            return int(self.shard_end[self.shard]) - self.first
        return None

    def _flush(self, k: int) -> None:
        """Write the first k buffered samples: a shard, or a fragment of one."""
        lengths = np.concatenate(self.lengths)
        ends = np.cumsum(lengths[:k])
        cut = int(ends[-1])
        tokens, npmi_, offsets = self.tokens[:cut], self.npmi[:cut], np.concatenate(([0], ends))
        name = shard_name(self.split, self.shard)
        if self.shard_end is None:
            whole = completes = True
        else:
            begins = int(self.shard_end[self.shard - 1]) if self.shard else 0
            completes = self.first + k == int(self.shard_end[self.shard])
            whole = begins >= self.s0 and completes
        if whole:
            self.entries.append(write_shard(self.directory / name, tokens, npmi_, offsets,
                                            split=self.split, **self.attrs))
        else:
            frag = write_shard(self.directory / f"part-{self.group:05d}-{name}", tokens, npmi_,
                               offsets, split=self.split, **self.attrs)
            self.fragments.append({**frag, "shard": self.shard, "group": self.group})
        rest = self.n - cut       # moved to the front (overlap-safe: numpy buffers it)
        self.tokens[:rest] = self.tokens[cut:self.n]
        self.npmi[:rest] = self.npmi[cut:self.n]
        self.lengths, self.n = [lengths[k:]], rest
        self.first += k
        if completes:
            self.shard += 1

    def close(self) -> list[dict]:
        """Write what is buffered (the last shard, or the start of one a later run completes);
        return the entries of the whole shards written."""
        if self.next > self.first:
            self._flush(self.next - self.first)
        return self.entries


class SplitShards:
    """The train and valid ShardWriters fed from cut pieces, with the counts the summary
    reports."""

    def __init__(self, writer: Callable[[str], ShardWriter]):
        self.writers = {split: writer(split) for split in SPLITS}
        self.non_acgt = self.dropped = 0
        self.samples = dict.fromkeys(SPLITS, 0)
        self.tokens = dict.fromkeys(SPLITS, 0)

    def add(self, cut: samples.PieceSamples) -> None:
        """One piece's samples (copied out: the writers keep nothing of `cut`)."""
        self.non_acgt += cut.non_acgt
        self.dropped += cut.dropped
        tok_valid = np.repeat(cut.valid, cut.lengths)
        for split, smask, tmask in (("train", ~cut.valid, ~tok_valid),
                                    ("valid", cut.valid, tok_valid)):
            self.writers[split].add(cut.tokens, cut.npmi, tmask, cut.lengths[smask])
            self.samples[split] += int(smask.sum())
            self.tokens[split] += int(cut.lengths[smask].sum())

    def close(self) -> list[dict]:
        """Entries of the whole shards, train before valid."""
        return [e for split in SPLITS for e in self.writers[split].close()]

    @property
    def fragments(self) -> list[dict]:
        return [f for split in SPLITS for f in self.writers[split].fragments]

    def stats(self) -> dict:
        return {"non_acgt": self.non_acgt, "dropped": self.dropped,
                "samples": dict(self.samples), "tokens": dict(self.tokens)}


def dataset_manifest(k: int, genome: Path, source_sha: str, params: dict, table_sha256: str,
                     entries: list[dict], summary: Summary, table: np.ndarray) -> Manifest:
    return Manifest(k=k, vocab_size=vocab_size(k),
                    source={"name": genome.name, "sha256": source_sha}, params=params,
                    npmi_table_sha256=table_sha256, shards=entries,
                    stats={**asdict(summary), "npmi_scored": int((~np.isnan(table)).sum()),
                           "npmi_scored_fraction": scored_fraction(table)})
