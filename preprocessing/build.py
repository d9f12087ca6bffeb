"""Genome -> npmi.tsv + HDF5 shards + manifest.json, atomically and idempotently.

Pass 1 counts n-grams (not with an external table) and lays out every piece's samples (a
ShardPlan: where each sample goes), then writes the NPMI table; pass 2 cuts the samples, which
the workers write straight into their shards and hash. Both stream the genome in pieces shared
among --workers processes (preprocessing.parallel), results taken in order so the output is the
same for any number.
Everything is written into a hidden sibling directory; the manifest is written last and only then
does the directory become OUT_DIR (preprocessing.output_dir, shared with the job array). A
killed build leaves at most that hidden directory, which the next build removes; OUT_DIR itself
never holds a manifest for partial data.
"""
from __future__ import annotations

import collections
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from cmgems.options import DEFAULT_SEED, option
from cmgems.errors import InputError
from cmgems.io import sha256_file
from cmgems.data.npmi_table import load_table, write_table
from cmgems.progress import Progress
from cmgems.data.layout import SPLITS, TABLE_NAME, shard_name
from cmgems.data.shards import NPMI_DTYPE, Manifest, ShardFile, create_shard, write_shard
from cmgems.data.tokens import K_RANGE

from . import genemask_samples, kmers, npmi, samples
from .dataset_writer import (Summary, check_train_samples, check_valid_records,
                                          check_writable, dataset_manifest, genome_sha256,
                                          shard_attrs, warn_if_unscored)
from .output_dir import INTERRUPTS, Staging, check_target, output_lock
from .fasta import FastaReader, Piece
from .parallel import PieceRunner, Scanned
from .shard_plan import ShardPlan

SAMPLINGS = ("dnabert", "genemask")
PIECE_BASES = 1 << 19   # part of the sample layout (recorded in params), not a tuning knob
# Bounds of the integer options: beyond them a value is a typo, and would otherwise fail late
# with a traceback (an int too large for numpy, an allocation of petabytes).
MAX_MIN_COUNT = 1 << 53          # more k-mers than any genome has; exact in float64
MAX_SEED = (1 << 63) - 1         # numpy's SeedSequence takes any such entropy word
MAX_WORKERS = 1024
MAX_SHARD_TOKENS = 1 << 30       # each split's shard buffer holds this many tokens in memory


def _in_range(name: str, value, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name}: must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise InputError(f"{name}: must be in {lo}..{hi}, got {value}")


@dataclass
class BuildConfig:
    """Everything `build` needs. Its options (preprocessing.__main__) are made from these fields
    by cmgems.options.add_arguments; genome and out_dir are positional there, piece_bases and
    cache_bytes are for tests and benchmarks only."""
    genome: Path                      # FASTA: plain, gzip or bgzip
    out_dir: Path                     # dataset directory to create
    k: int = option(6, "k-mer length, 3..6")
    min_count: int = option(101, "NPMI's c: k-mers seen fewer times get no score")
    npmi_definition: str = option(
        "genemask", "NPMI of a k-mer from the counts: genemask (GeneMask's published table: "
        "segmentations into parts of 1 and 2 bases, one common total) or levine (PMI-Masking: "
        "all segmentations, per-length totals)", choices=npmi.DEFINITIONS)
    # None: 0.02, or 0 with valid_records (the default depends on another option)
    valid_fraction: float | None = option(
        None, "share of samples (seeded) for the validation split; default 0.02, or 0 with "
              "--valid-records")
    valid_records: tuple[str, ...] = option(
        (), "comma-separated record names whose samples all go to validation")
    seed: int = option(DEFAULT_SEED, "seed of sample lengths and split")
    sampling: str = option(
        "dnabert", "how samples are cut: dnabert (510 or 5..510 tokens, never across a non-ACGT "
        "symbol) or genemask (GeneMask's notebook: N removed and flanks joined, random start "
        "below 1000, 511 or 6..510 nucleotides, duplicates removed, split drawn per sample)",
        choices=SAMPLINGS)
    workers: int = option(1, "processes counting and cutting pieces of the genome (1: all in "
                             "this process; the output is the same for any number)")
    npmi_table: Path | None = option(
        None, "use this NPMI table (our npmi.tsv, or GeneMask's CSV with ngram, "
              "norm_dp_true_pmi) instead of counting the genome")
    shard_tokens: int = option(4_000_000, "tokens per shard (whole samples; the last shard "
                                          "smaller)")
    overwrite: bool = option(False, "replace a dataset in OUT_DIR built with other parameters")
    piece_bases: int = option(PIECE_BASES, "bases per streamed piece (part of the sample "
                                           "layout)", cli=False)
    cache_bytes: int = option(256 << 20, "genomes up to this size are read once, not twice",
                              cli=False)

    def __post_init__(self):
        self.genome, self.out_dir = Path(self.genome), Path(self.out_dir)
        if self.k not in K_RANGE:
            raise InputError(f"--k: {self.k} not in {K_RANGE.start}..{K_RANGE.stop - 1}")
        if self.npmi_definition not in npmi.DEFINITIONS:
            raise InputError(f"--npmi-definition: {self.npmi_definition!r} is not one of "
                             f"{', '.join(npmi.DEFINITIONS)}")
        _in_range("--min-count", self.min_count, 1, MAX_MIN_COUNT)
        _in_range("--seed", self.seed, 0, MAX_SEED)
        if self.sampling not in SAMPLINGS:
            raise InputError(f"--sampling: {self.sampling!r} is not one of {', '.join(SAMPLINGS)}")
        _in_range("--workers", self.workers, 1, MAX_WORKERS)
        _in_range("--shard-tokens", self.shard_tokens, samples.MAX_TOKENS, MAX_SHARD_TOKENS)
        self.valid_records = tuple(self.valid_records)
        if self.valid_fraction is None:
            self.valid_fraction = 0.0 if self.valid_records else 0.02
        elif self.valid_records and self.valid_fraction:
            raise InputError("--valid-fraction and --valid-records: give one of them, not both")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise InputError(f"--valid-fraction: must be in [0, 1), got {self.valid_fraction}")
        _in_range("piece_bases", self.piece_bases, 64 * self.k, 1 << 30)
        _in_range("cache_bytes", self.cache_bytes, 0, 1 << 50)
        if self.npmi_table is not None:
            self.npmi_table = Path(self.npmi_table)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise InputError(f"{self.out_dir}: exists and is not a directory")

    @property
    def min_bases(self) -> int:
        return samples.MIN_TOKENS + self.k - 1


def params_of(cfg: BuildConfig, table_sha: str | None) -> dict:
    """Every parameter that shapes the output (not --workers or --overwrite)."""
    return {"k": cfg.k, "min_count": cfg.min_count,
            # an external table was made by its own definition, which it does not record
            "npmi_definition": cfg.npmi_definition if cfg.npmi_table is None else None,
            "valid_fraction": cfg.valid_fraction,
            "valid_records": list(cfg.valid_records), "seed": cfg.seed,
            "npmi_table": None if cfg.npmi_table is None else
            {"name": cfg.npmi_table.name, "sha256": table_sha},
            "shard_tokens": cfg.shard_tokens, "piece_bases": cfg.piece_bases,
            "min_tokens": samples.MIN_TOKENS, "max_tokens": samples.MAX_TOKENS,
            "full_length_fraction": samples.FULL_FRACTION, "sampling": cfg.sampling}


def _progress(desc: str, total: int | None) -> Progress:
    """A pass's bar on a terminal, in a log file a line every 10 s and one at its end."""
    return Progress(total, desc, unit="bp", unit_scale=True, seconds=10, leave=False)


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


def _chosen(reader: FastaReader, pieces: Callable[[int], bool] | None,
            cache: PieceCache | None, numbers: list[int] | None = None) -> Iterator[Piece]:
    """The reader's pieces whose number in the file `pieces` accepts (all without it), kept in
    the cache and their numbers appended to `numbers` on the way."""
    for i, p in enumerate(reader):
        if pieces is not None and not pieces(i):
            continue
        if cache is not None:
            cache.add(p)
        if numbers is not None:
            numbers.append(i)
        yield p


def count_ngrams(genome: Path, k: int, runner: PieceRunner, summary: Summary,
                 piece_bases: int = PIECE_BASES, cache: PieceCache | None = None,
                 pieces: Callable[[int], bool] | None = None) -> list[np.ndarray]:
    """n-gram counts, n = 1..k (list index n), of the records long enough for one sample
    (only of the pieces whose number in the file `pieces` accepts, when given)."""
    reader = FastaReader(genome, piece_bases, k - 1, samples.MIN_TOKENS + k - 1)
    table = np.zeros((k + 1) * 4 ** k, dtype=np.int64)

    with _progress("counting", None) as bar:
        for p, counts, non_acgt in runner.count(_chosen(reader, pieces, cache)):
            INTERRUPTS.check()
            table += counts
            summary.bases_non_acgt += non_acgt
            bar.update(len(p.seq) - p.overlap)
    summary.read(reader.stats)
    if cache is not None:
        cache.names = reader.stats.names
    return kmers.ngram_counts(table.reshape(k + 1, 4 ** k), k)


def scan_genome(cfg: BuildConfig, runner: PieceRunner, summary: Summary, count: bool,
                cache: PieceCache | None = None, pieces: Callable[[int], bool] | None = None,
                on_piece: Callable[[int, Scanned], None] | None = None
                ) -> list[np.ndarray] | None:
    """Pass 1: every piece's sample layout (given to `on_piece` with the piece's number in the
    file, in order) and, when `count`, the n-gram counts n = 1..k (list index n) of the records
    long enough for one sample; only the pieces whose number `pieces` accepts, when given."""
    k = cfg.k
    reader = FastaReader(cfg.genome, cfg.piece_bases, k - 1, cfg.min_bases)
    table = np.zeros((k + 1) * 4 ** k, dtype=np.int64) if count else None
    numbers = []

    with _progress("counting" if count else "scanning", None) as bar:
        for j, r in enumerate(runner.scan(_chosen(reader, pieces, cache, numbers), count,
                                          cfg.seed, cfg.valid_fraction, cfg.valid_records)):
            INTERRUPTS.check()
            if count:
                table += r.counts
            if on_piece is not None:
                on_piece(numbers[j], r)
            bar.update(len(r.piece.seq) - r.piece.overlap)
    summary.read(reader.stats)
    if cache is not None:
        cache.names = reader.stats.names
    check_valid_records(cfg.genome, cfg.valid_records, reader.stats.names)
    return kmers.ngram_counts(table.reshape(k + 1, 4 ** k), k) if count else None


def write_shards(cfg: BuildConfig, runner: PieceRunner, work: Path, table: np.ndarray,
                 attrs: dict, summary: Summary, plan: ShardPlan,
                 cache: PieceCache | None = None) -> list[dict]:
    """Pass 2: cut every piece again and write its samples where the plan puts them, in the
    workers; each shard is created here when its first piece is given, and hashed (by a
    worker) once its last piece is done. Returns the manifest entries, train before valid."""
    cached = cache is not None and cache.pieces is not None
    reader = cache.pieces if cached else FastaReader(cfg.genome, cfg.piece_bases, cfg.k - 1,
                                                     cfg.min_bases)
    runner.set_table(table)
    names = set(cfg.valid_records)
    files: dict[str, dict[int, ShardFile]] = {s: {} for s in SPLITS}
    entries: dict[tuple[int, int], dict] = {}
    given: collections.deque = collections.deque()    # what each task in flight was
    stats = {"non_acgt": 0, "dropped": 0, "samples": dict.fromkeys(SPLITS, 0),
             "tokens": dict.fromkeys(SPLITS, 0)}

    def take(bar) -> None:
        _, _, value = runner.result()
        what = given.popleft()
        if what[0] == "hash":
            _, split, sh = what
            n, t = plan.shards(split)[sh]
            entries[(SPLITS.index(split), sh)] = {"path": Path(files[split][sh].path).name,
                                                  "split": split, "samples": n, "tokens": t,
                                                  "sha256": value}
            return
        _, i, piece = what
        for split, want in plan.expected(i).items():
            if value[split] != want:
                raise InputError(f"{cfg.genome}: piece {i} gave {value[split][0]} {split} "
                                 f"samples in pass 2, {want[0]} in pass 1: the file changed "
                                 f"during the build")
            stats["samples"][split] += want[0]
            stats["tokens"][split] += want[1]
            for sh in plan.completed(split, i):
                runner.submit("hash", (files[split][sh].path,))
                given.append(("hash", split, int(sh)))
        stats["non_acgt"] += value["non_acgt"]
        stats["dropped"] += value["dropped"]
        bar.update(len(piece.seq) - piece.overlap)

    with _progress("sharding", summary.bases or None) as bar:
        i = -1
        for i, p in enumerate(reader):
            INTERRUPTS.check()
            if i >= plan.pieces:
                raise InputError(f"{cfg.genome}: more pieces in pass 2 than in pass 1: the "
                                 f"file changed during the build")
            parts = {}
            for split in SPLITS:
                for sh in plan.opening(split, i):
                    n, t = plan.shards(split)[sh]
                    files[split][int(sh)] = create_shard(work / shard_name(split, sh), t, n,
                                                         split=split, **attrs)
                parts[split] = plan.parts(split, i, files[split])
            while runner.full:
                take(bar)
            runner.submit("write", (cfg.seed, p.record, p.index, cfg.valid_fraction,
                                    p.name in names, parts), p)
            given.append(("piece", i, p))
        while runner.in_flight:
            take(bar)
    if i + 1 != plan.pieces:
        raise InputError(f"{cfg.genome}: {i + 1} pieces in pass 2, {plan.pieces} in pass 1: "
                         f"the file changed during the build")
    if not cached:
        summary.read(reader.stats)
    summary.bases_non_acgt = 0       # counted again here, as without pass 1
    summary.add_cuts(stats)
    check_train_samples(cfg.genome, cfg.min_bases, summary)
    return [entries[key] for key in sorted(entries)]


def write_npmi_table(path: Path, cfg: BuildConfig, source_sha: str,
                     counts: list[np.ndarray] | None, external: np.ndarray | None = None,
                     table_sha: str | None = None) -> np.ndarray:
    """npmi.tsv from whole-genome n-gram counts, or the external table; returns the NPMI per
    k-mer code that shards store. Shared by `build` and the job array's `table` stage, so both
    write the same bytes; and the shards' values are read back from the file written (repr()
    keeps every float64), as the array's later stages read them: one rounding, to the shards'
    dtype, on every path."""
    table_params = {"source": cfg.genome.name, "source_sha256": source_sha}
    if external is None:
        pmi, table = npmi.npmi(counts, cfg.k, cfg.min_count, definition=cfg.npmi_definition)
        write_table(path, table, counts[cfg.k], pmi,
                    {**table_params, "min_count": cfg.min_count,
                     "definition": cfg.npmi_definition,
                     "scored": int((~np.isnan(table)).sum())})
    else:
        table = external
        write_table(path, table, params={
            **table_params, "from": f"{Path(cfg.npmi_table).name} (sha256 {table_sha})"})
    warn_if_unscored(table, cfg.out_dir / TABLE_NAME if external is None else cfg.npmi_table,
                     cfg.min_count if external is None else None,
                     cfg.genome.name if external is None else cfg.npmi_table.name)
    return stored_table(path, cfg.k)


def stored_table(path: Path, k: int) -> np.ndarray:
    """The NPMI per k-mer code that shards hold, from a written npmi.tsv."""
    return load_table(path, k).astype(NPMI_DTYPE)


def _build_into(cfg: BuildConfig, work: Path, runner: PieceRunner, cache: PieceCache,
                external: np.ndarray | None, params: dict, source_sha: str,
                table_sha: str | None, summary: Summary, start: float) -> Manifest:
    """Both passes into the working directory; returns the manifest."""
    if cfg.sampling == "genemask":
        return _build_genemask_into(cfg, work, runner, cache, external, params, source_sha,
                                    table_sha, summary, start)
    plan = ShardPlan(cfg.shard_tokens)
    counts = scan_genome(cfg, runner, summary, external is None, cache,
                         on_piece=lambda _, r: plan.add(r.lengths, r.valid))
    plan.close()
    table = write_npmi_table(work / TABLE_NAME, cfg, source_sha, counts, external, table_sha)
    table_sha256 = sha256_file(work / TABLE_NAME)
    attrs = shard_attrs(cfg.k, table_sha256, source_sha, cfg.seed)
    entries = write_shards(cfg, runner, work, table, attrs, summary, plan, cache)
    summary.shards = len(entries)
    summary.seconds = time.perf_counter() - start
    return dataset_manifest(cfg.k, cfg.genome, source_sha, params, table_sha256, entries,
                            summary, table)


def _records(cfg: BuildConfig):
    """(record index, name, whole sequence) of every record long enough for one sample."""
    reader = FastaReader(cfg.genome, cfg.piece_bases, cfg.k - 1, cfg.min_bases)
    current, name, parts = None, "", []
    for p in reader:
        INTERRUPTS.check()
        if p.record != current and current is not None:
            yield current, name, b"".join(parts)
            parts = []
        current, name = p.record, p.name
        parts.append(p.seq[p.overlap:] if parts else p.seq)
    if current is not None:
        yield current, name, b"".join(parts)


def _build_genemask_into(cfg: BuildConfig, work: Path, runner: PieceRunner, cache: PieceCache,
                         external: np.ndarray | None, params: dict, source_sha: str,
                         table_sha: str | None, summary: Summary, start: float) -> Manifest:
    """--sampling genemask: the NPMI table as for dnabert (pass 1 counts the genome), then
    every record cut by preprocessing.genemask_samples, duplicates removed, split, sharded."""
    counts = scan_genome(cfg, runner, summary, external is None, cache)
    table = write_npmi_table(work / TABLE_NAME, cfg, source_sha, counts, external, table_sha)
    table_sha256 = sha256_file(work / TABLE_NAME)
    attrs = shard_attrs(cfg.k, table_sha256, source_sha, cfg.seed)
    names = set(cfg.valid_records)
    seen: set[bytes] = set()
    tokens, values, lengths, in_valid = [], [], [], []
    removed = 0
    with _progress("cutting (genemask)", summary.bases or None) as bar:
        for record, name, seq in _records(cfg):
            cut = genemask_samples.cut_record(seq, cfg.k, table,
                                              genemask_samples.record_rng(cfg.seed, record))
            first = np.array([piece not in seen and not seen.add(piece) for piece in cut.pieces],
                             dtype=bool)
            per_token = np.repeat(first, cut.lengths)
            tokens.append(cut.tokens[per_token])
            values.append(cut.npmi[per_token])
            lengths.append(cut.lengths[first])
            in_valid.append(np.full(int(first.sum()), name in names))
            removed += cut.removed_n
            bar.update(len(seq))
    tokens = np.concatenate(tokens) if tokens else np.empty(0, np.uint16)
    values = np.concatenate(values) if values else np.empty(0, table.dtype)
    lengths = np.concatenate(lengths) if lengths else np.empty(0, np.int64)
    valid = np.concatenate(in_valid) if in_valid else np.empty(0, bool)
    valid |= genemask_samples.split_draws(cfg.seed, len(lengths), cfg.valid_fraction)
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    entries = []
    stats = {"non_acgt": removed, "dropped": 0, "samples": dict.fromkeys(SPLITS, 0),
             "tokens": dict.fromkeys(SPLITS, 0)}
    for split in SPLITS:
        pick = np.flatnonzero(valid == (split == "valid"))
        # shard j holds the samples that start within its shard_tokens (whole samples)
        starts = np.cumsum(lengths[pick]) - lengths[pick]
        shard_of = starts // cfg.shard_tokens
        for j, sh in enumerate(np.unique(shard_of).tolist()):
            idx = pick[shard_of == sh]
            at = np.repeat(offsets[idx] - np.concatenate(([0], np.cumsum(lengths[idx])[:-1])),
                           lengths[idx]) + np.arange(int(lengths[idx].sum()))
            entries.append(write_shard(work / shard_name(split, j), tokens[at], values[at],
                                       np.concatenate(([0], np.cumsum(lengths[idx]))),
                                       split=split, **attrs))
        stats["samples"][split] = len(pick)
        stats["tokens"][split] = int(lengths[pick].sum())
    summary.bases_non_acgt = 0
    summary.add_cuts(stats)
    check_train_samples(cfg.genome, cfg.min_bases, summary)
    summary.shards = len(entries)
    summary.seconds = time.perf_counter() - start
    return dataset_manifest(cfg.k, cfg.genome, source_sha, params, table_sha256, entries,
                            summary, table)


def build(cfg: BuildConfig, out=sys.stdout) -> Manifest:
    """Build (or confirm up to date) the dataset cfg describes; return its manifest."""
    start = time.perf_counter()
    with output_lock(cfg.out_dir):
        source_sha = genome_sha256(cfg.genome)
        external = None
        table_sha = None
        if cfg.npmi_table is not None:
            external = load_table(cfg.npmi_table, cfg.k)
            table_sha = sha256_file(cfg.npmi_table)
        params = params_of(cfg, table_sha)

        if (m := check_target(cfg.out_dir, cfg.overwrite, params, source_sha, out)) is not None:
            return m

        summary = Summary()
        cache = PieceCache(cfg.cache_bytes)      # filled by pass 1
        with Staging(cfg.out_dir) as staging, INTERRUPTS, \
                PieceRunner(cfg.workers, cfg.piece_bases, cfg.k) as runner:
            manifest = _build_into(cfg, staging.dir, runner, cache, external, params, source_sha,
                                   table_sha, summary, start)
            staging.publish(manifest)
    for line in summary.lines():
        print(line, file=out)
    print(f"wrote {cfg.out_dir}", file=out)
    return manifest


def build_table(genome: Path, out_tsv: Path, k: int = BuildConfig.k,
                min_count: int = BuildConfig.min_count, workers: int = BuildConfig.workers,
                npmi_definition: str = BuildConfig.npmi_definition, out=sys.stdout) -> Path:
    """Only the NPMI table (the `npmi` command)."""
    if k not in K_RANGE:
        raise InputError(f"--k: {k} not in {K_RANGE.start}..{K_RANGE.stop - 1}")
    _in_range("--min-count", min_count, 1, MAX_MIN_COUNT)
    _in_range("--workers", workers, 1, MAX_WORKERS)
    if npmi_definition not in npmi.DEFINITIONS:
        raise InputError(f"--npmi-definition: {npmi_definition!r} is not one of "
                         f"{', '.join(npmi.DEFINITIONS)}")
    out_tsv = Path(out_tsv)
    check_writable(out_tsv, "NPMI table")
    start = time.perf_counter()
    source_sha = genome_sha256(genome)
    summary = Summary()
    with PieceRunner(workers, PIECE_BASES, k) as runner:
        counts = count_ngrams(Path(genome), k, runner, summary)
    pmi, table = npmi.npmi(counts, k, min_count, definition=npmi_definition)
    try:
        path = write_table(out_tsv, table, counts[k], pmi,
                           {"source": Path(genome).name, "source_sha256": source_sha,
                            "min_count": min_count, "definition": npmi_definition,
                            "scored": int((~np.isnan(table)).sum())})
    except OSError as e:      # the directory changed since the check, or the disk is full
        raise InputError(f"{out_tsv}: cannot write the NPMI table ({e.strerror or e})") from None
    warn_if_unscored(table, path, min_count, Path(genome).name)
    secs = time.perf_counter() - start
    print(f"{path}: {int((~np.isnan(table)).sum())} of {4 ** k} {k}-mers scored; "
          f"{summary.records} records, {summary.bases:,} bases, {secs:.2f} s", file=out)
    return path
