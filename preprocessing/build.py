"""Genome -> npmi.tsv + HDF5 shards + manifest.json, atomically and idempotently.

Pass 1 counts n-grams (skipped with an external table) and writes the NPMI table; pass 2 cuts
samples and writes shards. Both stream the genome in pieces shared among --workers processes
(preprocessing.parallel), results taken in order so the output is the same for any number. Everything is written into a hidden sibling directory; the manifest is written
last and only then does the directory become OUT_DIR. A killed build leaves at most that hidden
directory, which the next build removes; OUT_DIR itself never holds a manifest for partial data.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from cmgems.errors import InputError
from cmgems.npmi_table import load_table, write_table
from cmgems.io import sha256_file
from cmgems.shards import MANIFEST_NAME, Manifest, ShardError, verify, write_shard
from cmgems.tokens import K_RANGE, vocab_size
from preprocessing import kmers, npmi, samples
from preprocessing.fasta import FastaReader, Piece
from preprocessing.parallel import PieceRunner

TABLE_NAME = "npmi.tsv"
PIECE_BASES = 1 << 19   # part of the sample layout (recorded in params), not a tuning knob
PARTIAL_TAG = ".partial-"


@dataclass
class BuildConfig:
    """Everything `build` needs; the CLI options map one to one (piece_bases and cache_bytes
    are for tests and benchmarks)."""
    genome: Path                      # FASTA: plain, gzip or bgzip
    out_dir: Path                     # dataset directory to create
    k: int = 6                        # k-mer length (3..6)
    min_count: int = 101              # NPMI's c: k-mers seen fewer times are unscored
    valid_fraction: float | None = None   # share of samples for validation; None: 0.02, or 0 with valid_records
    valid_records: tuple[str, ...] = ()   # record names whose samples all go to validation
    seed: int = 0                     # sample lengths and split
    workers: int = 1                  # processes counting and cutting pieces
    npmi_table: Path | None = None    # external NPMI table instead of counting this genome
    shard_tokens: int = 4_000_000     # tokens per shard (whole samples; the last one smaller)
    overwrite: bool = False           # replace a dataset built with other parameters
    piece_bases: int = PIECE_BASES    # bases per streamed piece
    cache_bytes: int = 256 << 20      # genomes up to this size are read once, not twice

    def __post_init__(self):
        self.genome, self.out_dir = Path(self.genome), Path(self.out_dir)
        if self.k not in K_RANGE:
            raise InputError(f"--k: {self.k} not in {K_RANGE.start}..{K_RANGE.stop - 1}")
        if self.min_count < 1:
            raise InputError(f"--min-count: must be >= 1, got {self.min_count}")
        self.valid_records = tuple(self.valid_records)
        if self.valid_fraction is None:
            self.valid_fraction = 0.0 if self.valid_records else 0.02
        elif self.valid_records and self.valid_fraction:
            raise InputError("--valid-fraction and --valid-records: give one of them, not both")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise InputError(f"--valid-fraction: must be in [0, 1), got {self.valid_fraction}")
        if self.workers < 1:
            raise InputError(f"--workers: must be >= 1, got {self.workers}")
        if self.shard_tokens < samples.MAX_TOKENS:
            raise InputError(f"--shard-tokens: must be >= {samples.MAX_TOKENS}, got {self.shard_tokens}")
        if self.piece_bases < 64 * self.k:
            raise InputError(f"piece_bases: must be >= {64 * self.k}, got {self.piece_bases}")
        if self.cache_bytes < 0:
            raise InputError(f"cache_bytes: must be >= 0, got {self.cache_bytes}")
        if self.npmi_table is not None:
            self.npmi_table = Path(self.npmi_table)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise InputError(f"{self.out_dir}: exists and is not a directory")

    @property
    def min_bases(self) -> int:
        return samples.MIN_TOKENS + self.k - 1


@dataclass
class Summary:
    """The closing summary (also the manifest's stats)."""
    records: int = 0
    empty_records: int = 0
    short_records: int = 0
    bases: int = 0
    bases_short_records: int = 0
    bases_non_acgt: int = 0
    tokens_dropped: int = 0
    samples: dict = field(default_factory=lambda: {"train": 0, "valid": 0})
    tokens: dict = field(default_factory=lambda: {"train": 0, "valid": 0})
    shards: int = 0
    seconds: float = 0.0

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


def params_of(cfg: BuildConfig, table_sha: str | None) -> dict:
    """Every parameter that shapes the output (not --workers or --overwrite)."""
    return {"k": cfg.k, "min_count": cfg.min_count, "valid_fraction": cfg.valid_fraction,
            "valid_records": list(cfg.valid_records), "seed": cfg.seed,
            "npmi_table": None if cfg.npmi_table is None else
            {"name": cfg.npmi_table.name, "sha256": table_sha},
            "shard_tokens": cfg.shard_tokens, "piece_bases": cfg.piece_bases,
            "min_tokens": samples.MIN_TOKENS, "max_tokens": samples.MAX_TOKENS,
            "full_length_fraction": samples.FULL_FRACTION}


class _Interrupts:
    """SIGINT/SIGTERM raise KeyboardInterrupt as usual, and are also remembered: Python drops
    an exception raised inside a finalizer or fork hook, so the build checks `check()` after
    every piece and before publishing, and an interrupted build never publishes."""

    def __init__(self):
        self.received: int | None = None
        self.saved = {}

    def __enter__(self):
        self.received = None
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.saved[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        first = self.received is None
        self.received = signum
        if first:
            raise KeyboardInterrupt

    def check(self) -> None:
        if self.received is not None:
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        self.saved, self.received = {}, None


_INTERRUPTS = _Interrupts()   # active during build(); check() is a no-op outside it


def _progress(desc: str, total: int | None):
    return tqdm(desc=desc, total=total, unit="bp", unit_scale=True, file=sys.stderr,
                mininterval=0.5, leave=False)


# ---- the two passes ----

class PieceCache:
    """Pass 1's pieces kept for pass 2 while they fit in `budget` bytes: a genome that fits is
    decompressed and parsed once. A larger one overflows the cache, which then holds nothing,
    and pass 2 reads the file again; memory stays bounded either way."""

    def __init__(self, budget: int):
        self.budget, self.size = budget, 0
        self.pieces: list[Piece] | None = []
        self.names: list[str] = []

    def add(self, p: Piece) -> None:
        if self.pieces is None:
            return
        self.size += len(p.seq)
        if self.size > self.budget:
            self.pieces = None
        else:
            self.pieces.append(p)


def count_ngrams(genome: Path, k: int, runner: PieceRunner, summary: Summary,
                 piece_bases: int = PIECE_BASES, cache: PieceCache | None = None,
                 pieces: Callable[[int], bool] | None = None) -> list[np.ndarray]:
    """n-gram counts, n = 1..k (list index n), of the records long enough for one sample
    (only of the pieces whose number in the file `pieces` accepts, when given)."""
    reader = FastaReader(genome, piece_bases, k - 1, samples.MIN_TOKENS + k - 1)
    table = np.zeros((k + 1) * 4 ** k, dtype=np.int64)

    def tasks():
        for i, p in enumerate(reader):
            if pieces is not None and not pieces(i):
                continue
            if cache is not None:
                cache.add(p)
            yield p, ()

    with _progress("counting", None) as bar:
        for p, slot, non_acgt in runner.map("count", tasks()):
            _INTERRUPTS.check()
            table += runner.arena.view(slot, "counts")
            summary.bases_non_acgt += non_acgt
            bar.update(len(p.seq) - p.overlap)
    _reader_stats(reader, summary)
    if cache is not None:
        cache.names = reader.stats.names
    return kmers.ngram_counts(table.reshape(k + 1, 4 ** k), k)


def _reader_stats(reader: FastaReader, summary: Summary) -> None:
    st = reader.stats
    summary.records, summary.bases = st.records, st.bases
    summary.empty_records, summary.short_records = st.empty_records, st.short_records
    summary.bases_short_records = st.short_record_bases


class _ShardWriter:
    """Collects the samples of one split and writes a shard each time shard_tokens are reached.

    Tokens are compressed straight out of the arena slot into a preallocated buffer (one copy,
    no concatenation); a shard ends after the sample that reaches shard_tokens.
    """

    def __init__(self, directory: Path, split: str, shard_tokens: int, piece_tokens: int,
                 attrs: dict):
        self.directory, self.split, self.shard_tokens, self.attrs = directory, split, shard_tokens, attrs
        capacity = shard_tokens + piece_tokens      # np.empty: pages are touched only when used
        self.tokens = np.empty(capacity, np.uint16)
        self.npmi = np.empty(capacity, np.float16)
        self.lengths: list[np.ndarray] = []
        self.n = 0
        self.entries: list[dict] = []

    def add(self, tokens: np.ndarray, npmi_: np.ndarray, token_mask: np.ndarray,
            lengths: np.ndarray) -> None:
        m = int(lengths.sum())
        if not m:
            return
        np.compress(token_mask, tokens, out=self.tokens[self.n:self.n + m])
        np.compress(token_mask, npmi_, out=self.npmi[self.n:self.n + m])
        self.lengths.append(lengths.copy())
        self.n += m
        while self.n >= self.shard_tokens:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        lengths = np.concatenate(self.lengths)
        ends = np.cumsum(lengths)
        k = len(lengths) if final else int(np.searchsorted(ends, self.shard_tokens)) + 1
        cut = int(ends[k - 1])
        path = self.directory / f"{self.split}-{len(self.entries):05d}.h5"
        self.entries.append(write_shard(path, self.tokens[:cut], self.npmi[:cut],
                                        np.concatenate(([0], ends[:k])), split=self.split,
                                        **self.attrs))
        rest = self.n - cut       # moved to the front (overlap-safe: numpy buffers it)
        self.tokens[:rest] = self.tokens[cut:self.n]
        self.npmi[:rest] = self.npmi[cut:self.n]
        self.lengths, self.n = [lengths[k:]], rest

    def close(self) -> list[dict]:
        if self.n:
            self._flush(final=True)
        return self.entries


def write_shards(cfg: BuildConfig, runner: PieceRunner, work: Path, table: np.ndarray,
                 attrs: dict, summary: Summary, cache: PieceCache | None = None) -> list[dict]:
    cached = cache is not None and cache.pieces is not None
    reader = cache.pieces if cached else FastaReader(cfg.genome, cfg.piece_bases, cfg.k - 1,
                                                     cfg.min_bases)
    runner.arena.table()[:] = table
    valid_names = set(cfg.valid_records)
    writers = {s: _ShardWriter(work, s, cfg.shard_tokens, cfg.piece_bases + cfg.k, attrs)
               for s in ("train", "valid")}
    arena = runner.arena

    def tasks():
        for p in reader:
            yield p, (cfg.seed, p.record, p.index, cfg.valid_fraction, p.name in valid_names)

    summary.bases_non_acgt = 0
    with _progress("sharding", summary.bases or None) as bar:
        for p, slot, (nt, ns, dropped, non_acgt) in runner.map("cut", tasks()):
            _INTERRUPTS.check()
            summary.bases_non_acgt += non_acgt
            summary.tokens_dropped += dropped
            tokens, npmi_ = arena.view(slot, "tokens", nt), arena.view(slot, "npmi", nt)
            lengths, valid = arena.view(slot, "lengths", ns), arena.view(slot, "valid", ns)
            tok_valid = np.repeat(valid, lengths)
            # the writers copy out of the slot, which a later piece reuses
            for split, smask, tmask in (("train", ~valid, ~tok_valid), ("valid", valid, tok_valid)):
                writers[split].add(tokens, npmi_, tmask, lengths[smask])
                summary.samples[split] += int(smask.sum())
                summary.tokens[split] += int(lengths[smask].sum())
            bar.update(len(p.seq) - p.overlap)
    if not cached:
        _reader_stats(reader, summary)
    names = cache.names if cached else reader.stats.names
    missing = sorted(valid_names - set(names))
    if missing:
        raise InputError(f"--valid-records: {', '.join(missing)} not found in {cfg.genome} "
                         f"(records: {', '.join(names[:10])}{' ...' if len(names) > 10 else ''})")
    entries = writers["train"].close() + writers["valid"].close()
    if not summary.samples["train"]:
        raise InputError(f"{cfg.genome}: no training samples (no ACGT stretch of "
                         f"{cfg.min_bases}+ bases outside the validation split)")
    return entries


# ---- the output directory ----

def _stale_partials(out: Path) -> list[Path]:
    found = []
    for p in out.parent.glob(f".{out.name}{PARTIAL_TAG}*"):
        try:
            os.kill(int(p.name.rsplit("-", 1)[1]), 0)
        except (ValueError, ProcessLookupError):
            found.append(p)
        except PermissionError:
            pass
    return found


def _up_to_date(cfg: BuildConfig, params: dict, source_sha: str) -> Manifest | None:
    try:
        m = Manifest.load(cfg.out_dir)
        if m.params != params or m.source.get("sha256") != source_sha:
            return None
        verify(cfg.out_dir, m)
        if sha256_file(cfg.out_dir / TABLE_NAME) != m.npmi_table_sha256:
            return None
    except (ShardError, OSError):
        return None
    return m


def _describe_difference(out: Path, params: dict, source_sha: str) -> str:
    try:
        m = Manifest.load(out)
    except ShardError:
        return "it is not empty and holds no finished dataset"
    diff = [k for k in params if m.params.get(k) != params[k]]
    if m.source.get("sha256") != source_sha:
        diff.insert(0, f"source ({m.source.get('name')})")
    if not diff:
        return "its files differ from its manifest"
    return "it holds a dataset built with different " + ", ".join(diff)


def _publish(work: Path, out: Path, entries: list[dict]) -> None:
    """Move the finished files into OUT_DIR, manifest last (work/ already holds it)."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        os.replace(work, out)       # one rename: the dataset appears whole
        return
    (out / MANIFEST_NAME).unlink(missing_ok=True)   # from here the old dataset no longer loads
    for old in list(out.glob("train-*.h5")) + list(out.glob("valid-*.h5")):
        old.unlink()
    for e in entries:
        os.replace(work / e["path"], out / e["path"])
    os.replace(work / TABLE_NAME, out / TABLE_NAME)
    os.replace(work / MANIFEST_NAME, out / MANIFEST_NAME)
    shutil.rmtree(work)


def write_npmi_table(path: Path, cfg: BuildConfig, source_sha: str,
                     counts: list[np.ndarray] | None, external: np.ndarray | None = None,
                     table_sha: str | None = None) -> np.ndarray:
    """npmi.tsv from whole-genome n-gram counts, or the external table; returns the NPMI per
    k-mer code. Shared by `build` and the job array's `table` stage, so both write the same bytes."""
    table_params = {"source": cfg.genome.name, "source_sha256": source_sha}
    if external is None:
        pmi, table = npmi.npmi(counts, cfg.k, cfg.min_count)
        write_table(path, table, counts[cfg.k], pmi,
                    {**table_params, "min_count": cfg.min_count,
                     "scored": int((~np.isnan(table)).sum())})
    else:
        table = external
        write_table(path, table, params={
            **table_params, "from": f"{Path(cfg.npmi_table).name} (sha256 {table_sha})"})
    return table


def _build_into(cfg: BuildConfig, work: Path, runner: PieceRunner, cache: PieceCache | None,
                external: np.ndarray | None, params: dict, source_sha: str,
                table_sha: str | None, summary: Summary, start: float) -> Manifest:
    """Both passes into the working directory, manifest last; returns the manifest."""
    counts = None
    if external is None:
        counts = count_ngrams(cfg.genome, cfg.k, runner, summary, cfg.piece_bases, cache)
    table = write_npmi_table(work / TABLE_NAME, cfg, source_sha, counts, external, table_sha)
    table_sha256 = sha256_file(work / TABLE_NAME)
    attrs = {"k": cfg.k, "vocab_size": vocab_size(cfg.k), "npmi_table_sha256": table_sha256,
             "source_sha256": source_sha, "seed": cfg.seed}
    entries = write_shards(cfg, runner, work, table, attrs, summary, cache)
    summary.shards = len(entries)
    summary.seconds = time.perf_counter() - start
    manifest = Manifest(k=cfg.k, vocab_size=vocab_size(cfg.k),
                        source={"name": cfg.genome.name, "sha256": source_sha},
                        params=params, npmi_table_sha256=table_sha256, shards=entries,
                        stats={**summary.__dict__, "npmi_scored": int((~np.isnan(table)).sum())})
    manifest.save(work)
    return manifest


def check_target(cfg: BuildConfig, params: dict, source_sha: str, out=sys.stdout,
                 overwrite_flag: str = "--overwrite") -> Manifest | None:
    """The finished dataset if OUT_DIR already holds exactly this one ("up to date"), None if it
    may be written; refuses a non-empty OUT_DIR holding anything else unless --overwrite."""
    if (m := _up_to_date(cfg, params, source_sha)) is not None:
        print(f"{cfg.out_dir}: up to date ({len(m.shards)} shards, nothing rewritten)", file=out)
        return m
    if cfg.out_dir.is_dir() and any(cfg.out_dir.iterdir()) and not cfg.overwrite:
        raise InputError(f"{cfg.out_dir}: refusing to write: "
                         f"{_describe_difference(cfg.out_dir, params, source_sha)}; "
                         f"pass {overwrite_flag} to replace it")
    return None


def build(cfg: BuildConfig, out=sys.stdout) -> Manifest:
    """Build (or confirm up to date) the dataset cfg describes; return its manifest."""
    start = time.perf_counter()
    try:
        source_sha = sha256_file(cfg.genome)
    except OSError as e:
        raise InputError(f"{cfg.genome}: cannot read genome ({e.strerror or e})") from None
    external = None
    table_sha = None
    if cfg.npmi_table is not None:
        external = load_table(cfg.npmi_table, cfg.k)
        table_sha = sha256_file(cfg.npmi_table)
    params = params_of(cfg, table_sha)

    if (m := check_target(cfg, params, source_sha, out)) is not None:
        return m

    out_dir = cfg.out_dir.resolve()     # "." or "x/" still has a parent and a name
    for stale in _stale_partials(out_dir):
        shutil.rmtree(stale, ignore_errors=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = out_dir.parent / f".{out_dir.name}{PARTIAL_TAG}{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    summary = Summary()
    cache = PieceCache(cfg.cache_bytes) if external is None else None   # filled by pass 1
    runner = None
    try:
        with _INTERRUPTS:
            runner = PieceRunner(cfg.workers, cfg.piece_bases, cfg.k)
            manifest = _build_into(cfg, work, runner, cache, external, params, source_sha,
                                   table_sha, summary, start)
            _INTERRUPTS.check()
            _publish(work, out_dir, manifest.shards)
    except BaseException as e:
        if runner is not None:
            runner.close(kill=True)
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(e, OSError):   # a full disk or a read-only directory, say
            raise InputError(f"{out_dir}: cannot write the dataset ({e.strerror or e})") from None
        raise
    runner.close()
    for line in summary.lines():
        print(line, file=out)
    print(f"wrote {cfg.out_dir}", file=out)
    return manifest


def build_table(genome: Path, out_tsv: Path, k: int = 6, min_count: int = 101,
                workers: int = 1, out=sys.stdout) -> Path:
    """Only the NPMI table (the `npmi` command)."""
    if k not in K_RANGE:
        raise InputError(f"--k: {k} not in {K_RANGE.start}..{K_RANGE.stop - 1}")
    if min_count < 1 or workers < 1:
        raise InputError(f"--min-count and --workers must be >= 1 (got {min_count}, {workers})")
    start = time.perf_counter()
    try:
        source_sha = sha256_file(genome)
    except OSError as e:
        raise InputError(f"{genome}: cannot read genome ({e.strerror or e})") from None
    summary = Summary()
    runner = PieceRunner(workers, PIECE_BASES, k)
    try:
        counts = count_ngrams(Path(genome), k, runner, summary)
    except BaseException:
        runner.close(kill=True)
        raise
    runner.close()
    pmi, table = npmi.npmi(counts, k, min_count)
    path = write_table(out_tsv, table, counts[k], pmi,
                       {"source": Path(genome).name, "source_sha256": source_sha,
                        "min_count": min_count, "scored": int((~np.isnan(table)).sum())})
    secs = time.perf_counter() - start
    print(f"{path}: {int((~np.isnan(table)).sum())} of {4 ** k} {k}-mers scored; "
          f"{summary.records} records, {summary.bases:,} bases, {secs:.2f} s", file=out)
    return path
