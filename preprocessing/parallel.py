"""Running per-piece work in worker processes with nothing but small messages on the pipes.

Every array crosses between processes through one anonymous shared mapping (the arena, created
before the workers fork, so they inherit it): a piece's bases go in, its counts, layout or
tokens come out. The pipes carry only a few integers per task. multiprocessing.Pool pickled
megabytes per piece through helper threads that wait on the parent's GIL, which made two workers
slower than one; this runner has no helper threads.

Tasks are handed out as they come: to a helper with fewer than `depth` tasks outstanding, else
run here at once. So the calling process, which also reads the genome, takes only the work the
helpers leave, and N workers keep N cores busy. Results are taken in the order the tasks were
given, whoever ran them, so the output does not depend on the number of workers. A task that
uses the arena takes slot i % slots for its i-th such task; at most `slots` are in flight, so a
slot is rewritten only after the caller has taken its previous result (callers copy what they
keep before asking for the next). With workers == 1 everything runs in this process.

The tasks: count (n-gram counts, for `npmi`), scan (counts and the sample layout, pass 1 of
build), cut (the samples, for the job array's stages), write (cut and write the samples into
their shards, pass 2 of build), hash (a finished shard's sha256).
"""
from __future__ import annotations

import collections
import ctypes
import mmap
import multiprocessing as mp
import signal
from typing import Iterable, Iterator, NamedTuple

import numpy as np

from cmgems.io import sha256_file
from cmgems.data.shards import NPMI_DTYPE, write_part

from . import kmers, samples
from .fasta import Piece

# Queued tasks in all helpers together: enough that a helper never waits while this process
# reads the genome (measured best on 2 cores: 8 for one helper), two at least per helper.
QUEUED = 8
# Slots for this process's own results, which wait behind older ones (taken in order): with
# fewer, it stalls on a helper instead of working.
AHEAD = 12


class Scanned(NamedTuple):
    """Pass 1's result for one piece (PieceRunner.scan)."""
    piece: Piece
    counts: np.ndarray | None     # [(k+1) * 4^k] count_table, when counting
    lengths: np.ndarray           # tokens per sample
    valid: np.ndarray             # per sample: in the validation split
    dropped: int                  # tokens in fragments shorter than a sample
    non_acgt: int                 # non-ACGT symbols (overlap excluded)


def keep_freed_memory() -> None:
    """Have glibc keep the memory numpy frees, for the next piece to reuse: by default a piece's
    temporaries (a few MiB each) are returned to the kernel when freed and come back as fresh
    pages, a page fault per 4 KiB; in a forked helper that was a third of its CPU time. Serve
    allocations up to 32 MiB from the heap and trim it only beyond 256 MiB free. Inherited by
    the helpers forked afterwards; a no-op where the C library has no mallopt."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3          # glibc's malloc.h
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 256 << 20)


class Arena:
    """Per-slot regions: seq (input bases), counts, tokens, npmi, lengths, valid; plus the NPMI
    table shared by all slots."""

    def __init__(self, slots: int, piece_bases: int, k: int):
        self.slots, self.k = slots, k
        max_bases = piece_bases + k          # a piece is shorter than piece_bases + k - 1
        max_samples = max_bases // samples.MIN_TOKENS + 1
        spec = [("seq", np.uint8, max_bases), ("counts", np.int64, (k + 1) * 4 ** k),
                ("tokens", np.uint16, max_bases), ("npmi", NPMI_DTYPE, max_bases),
                ("lengths", np.int64, max_samples), ("valid", np.bool_, max_samples)]
        self.regions, offset = {}, 0
        for name, dtype, n in spec:
            self.regions[name] = (offset, np.dtype(dtype), n)
            offset += -(-n * np.dtype(dtype).itemsize // 8) * 8
        self.slot_bytes = offset
        self.table_offset = slots * offset
        self.mm = mmap.mmap(-1, self.table_offset + NPMI_DTYPE().itemsize * 4 ** k)

    def view(self, slot: int, name: str, n: int | None = None) -> np.ndarray:
        offset, dtype, size = self.regions[name]
        return np.frombuffer(self.mm, dtype, size if n is None else n,
                             slot * self.slot_bytes + offset)

    def table(self) -> np.ndarray:
        """NPMI per k-mer code as shards store it, read by every cut task."""
        return np.frombuffer(self.mm, NPMI_DTYPE, 4 ** self.k, self.table_offset)


# ---- the tasks (run in a helper or in the calling process) ----

def _count(arena: Arena, slot: int, n: int, overlap: int) -> int:
    table, non_acgt = kmers.count_table(arena.view(slot, "seq", n).tobytes(), arena.k, overlap)
    arena.view(slot, "counts")[:] = table.ravel()
    return non_acgt


def _rng(seed: int, record: int, index: int) -> np.random.Generator:
    """The generator of one piece's sample layout: the same whoever cuts the piece."""
    return np.random.default_rng([seed, record, index])


def _scan(arena: Arena, slot: int, n: int, overlap: int, count: bool, seed: int, record: int,
          index: int, valid_fraction: float, all_valid: bool) -> tuple[int, int, int]:
    """Pass 1: n-gram counts (when `count`) and the sample layout, from one windows() pass."""
    codes = kmers.encode(arena.view(slot, "seq", n).tobytes())
    code, vlen = kmers.windows(codes, arena.k)
    if count:
        arena.view(slot, "counts")[:] = kmers.count_windows(code, vlen, arena.k, overlap).ravel()
    lay = samples.layout(vlen, arena.k, _rng(seed, record, index), valid_fraction, all_valid)
    ns = len(lay.lengths)
    arena.view(slot, "lengths", ns)[:] = lay.lengths
    arena.view(slot, "valid", ns)[:] = lay.valid
    return ns, lay.dropped, kmers.non_acgt(codes, overlap)


def _cut_samples(arena: Arena, slot: int, n: int, overlap: int, seed: int, record: int,
                 index: int, valid_fraction: float, all_valid: bool) -> samples.PieceSamples:
    return samples.cut_piece(arena.view(slot, "seq", n).tobytes(), overlap, arena.k,
                             arena.table(), _rng(seed, record, index), valid_fraction, all_valid)


def _cut(arena: Arena, slot: int, n: int, overlap: int, *piece: object
         ) -> tuple[int, int, int, int]:
    ps = _cut_samples(arena, slot, n, overlap, *piece)
    nt, ns = len(ps.tokens), len(ps.lengths)
    arena.view(slot, "tokens", nt)[:] = ps.tokens
    arena.view(slot, "npmi", nt)[:] = ps.npmi
    arena.view(slot, "lengths", ns)[:] = ps.lengths
    arena.view(slot, "valid", ns)[:] = ps.valid
    return nt, ns, ps.dropped, ps.non_acgt


def _write(arena: Arena, slot: int, n: int, overlap: int, seed: int, record: int, index: int,
           valid_fraction: float, all_valid: bool, parts: dict) -> dict:
    """Pass 2: cut the piece and write each split's samples into their shards (parts: the
    ShardPlan's Parts per split); returns what the piece gave, for the caller's checks."""
    ps = _cut_samples(arena, slot, n, overlap, seed, record, index, valid_fraction, all_valid)
    tok_valid = np.repeat(ps.valid, ps.lengths)
    out = {"dropped": ps.dropped, "non_acgt": ps.non_acgt}
    for split, smask, tmask in (("train", ~ps.valid, ~tok_valid), ("valid", ps.valid, tok_valid)):
        lengths = ps.lengths[smask]
        out[split] = (len(lengths), int(lengths.sum()))
        if not parts[split]:
            continue
        tokens, npmi = ps.tokens[tmask], ps.npmi[tmask]
        starts = np.concatenate(([0], np.cumsum(lengths)))
        for part in parts[split]:
            t0, t1 = int(starts[part.first]), int(starts[part.stop])
            write_part(part.shard, tokens[t0:t1], npmi[t0:t1], lengths[part.first:part.stop],
                       part.token_at, part.sample_at)
    return out


def _hash(arena: Arena, path: str) -> str:
    return sha256_file(path)


TASKS = {"count": _count, "scan": _scan, "cut": _cut, "write": _write, "hash": _hash}
_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _serve(conn, arena: Arena) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the parent handles Ctrl-C and ends us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler, inherited by fork
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)   # blocked by the parent for the fork
    while True:
        try:
            msg = conn.recv()
        except EOFError:      # the parent is gone (killed): nothing left to do
            return
        if msg is None:
            return
        kind, args = msg
        try:
            conn.send((True, TASKS[kind](arena, *args)))
        except BaseException as e:   # report, keep serving; the parent decides
            conn.send((False, e))


class PieceRunner:
    """Ordered count/scan/cut/write/hash tasks, shared by this process and workers - 1 forked
    helpers (module docstring). `submit` a task, `result` takes the oldest one's result.

    As a context manager it closes the helpers on the way out, killing them if the block failed.
    """

    def __init__(self, workers: int, piece_bases: int, k: int):
        self.workers = workers
        keep_freed_memory()
        self.depth = max(2, QUEUED // max(1, workers - 1))
        slots = self.depth * (workers - 1) + AHEAD if workers > 1 else 1
        self.arena = Arena(slots, piece_bases, k)
        self.conns, self.procs = [], []
        # (helper or None, piece, slot, value) of every task given and not yet taken
        self.pending: collections.deque = collections.deque()
        self.outstanding = [0] * (workers - 1)    # given to the helper, result not received
        self.received = [collections.deque() for _ in range(workers - 1)]
        self.slot_tasks = 0           # tasks given that use a slot
        self.slots_in_flight = 0
        ctx = mp.get_context("fork")
        # Ctrl-C reaches every process of the terminal's group: one arriving between fork and
        # _serve's handlers would run the parent's handler in the child (a traceback there).
        # Blocked meanwhile, it waits and is then delivered to the parent only.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            for _ in range(workers - 1):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_serve, args=(child, self.arena), daemon=True)
                proc.start()
                child.close()
                self.conns.append(parent)
                self.procs.append(proc)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def __enter__(self) -> "PieceRunner":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(kill=exc_type is not None)

    # ---- the queue ----

    @property
    def full(self) -> bool:
        """No slot free: take a result before submitting another piece."""
        return self.slots_in_flight >= self.arena.slots

    def submit(self, kind: str, args: tuple = (), piece: Piece | None = None) -> None:
        """Give a task: with `piece`, its bases are copied into the next slot, and the slot,
        the bases' length and the piece's overlap come before `args`."""
        slot = None
        if piece is not None:
            if self.full:
                raise RuntimeError("PieceRunner: no free slot; take a result first")
            slot = self.slot_tasks % self.arena.slots
            self.slot_tasks += 1
            self.slots_in_flight += 1
            self.arena.view(slot, "seq", len(piece.seq))[:] = np.frombuffer(piece.seq, np.uint8)
            args = (slot, len(piece.seq), piece.overlap, *args)
        self._collect()
        helper = min(range(self.workers - 1), key=self.outstanding.__getitem__, default=None)
        if helper is not None and self.outstanding[helper] < self.depth:
            self.conns[helper].send((kind, args))
            self.outstanding[helper] += 1
            self.pending.append((helper, piece, slot, None))
        else:                   # every helper busy: this process's share, done now
            self.pending.append((None, piece, slot, TASKS[kind](self.arena, *args)))

    def _collect(self) -> None:
        """Receive the results helpers have sent (kept until taken in order): a helper's
        outstanding count is then what it still has to do, not what the caller has not taken."""
        for helper, conn in enumerate(self.conns):
            while self.outstanding[helper] and conn.poll():
                self.received[helper].append(self._recv(helper))
                self.outstanding[helper] -= 1

    def _recv(self, helper: int) -> tuple[bool, object]:
        try:
            return self.conns[helper].recv()
        except EOFError:
            self.procs[helper].join(1)
            code = self.procs[helper].exitcode
            if code in (-signal.SIGTERM, -signal.SIGINT):   # a signal to the whole group
                raise KeyboardInterrupt from None
            raise RuntimeError(f"preprocessing worker {helper} died (exit code {code})") from None

    @property
    def in_flight(self) -> int:
        return len(self.pending)

    def result(self) -> tuple[Piece | None, int | None, object]:
        """(piece, slot, value) of the oldest task given."""
        helper, piece, slot, value = self.pending.popleft()
        if slot is not None:
            self.slots_in_flight -= 1
        if helper is None:
            return piece, slot, value
        if self.received[helper]:
            ok, value = self.received[helper].popleft()
        else:
            ok, value = self._recv(helper)
            self.outstanding[helper] -= 1
        if not ok:
            raise value
        return piece, slot, value

    def map(self, kind: str, tasks: Iterable[tuple[Piece, tuple]]
            ) -> Iterator[tuple[Piece, int, object]]:
        """Yield (piece, slot, result) in order for each (piece, extra args) of `tasks`."""
        for piece, extra in tasks:
            while self.full:
                yield self.result()
            self.submit(kind, extra, piece)
        while self.pending:
            yield self.result()

    # ---- per-piece maps ----

    def count(self, pieces: Iterable[Piece]) -> Iterator[tuple[Piece, np.ndarray, int]]:
        """(piece, n-gram counts [(k+1) * 4^k], non-ACGT symbols) of each piece, in order; the
        counts are a view of the arena, valid until the next piece is taken."""
        for p, slot, non_acgt in self.map("count", ((p, ()) for p in pieces)):
            yield p, self.arena.view(slot, "counts"), non_acgt

    def scan(self, pieces: Iterable[Piece], count: bool, seed: int, valid_fraction: float,
             valid_records: Iterable[str] = ()) -> Iterator[Scanned]:
        """What pass 1 learns of each piece, in order: its n-gram counts (when `count`) and the
        lengths and split of its samples, as `cut` and `write` will cut them. Views of the
        arena, valid until the next piece is taken."""
        names = set(valid_records)
        tasks = ((p, (count, seed, p.record, p.index, valid_fraction, p.name in names))
                 for p in pieces)
        view = self.arena.view
        for p, slot, (ns, dropped, non_acgt) in self.map("scan", tasks):
            yield Scanned(p, view(slot, "counts") if count else None, view(slot, "lengths", ns),
                          view(slot, "valid", ns), dropped, non_acgt)

    def cut(self, pieces: Iterable[Piece], seed: int, valid_fraction: float,
            valid_records: Iterable[str] = (), table: np.ndarray | None = None
            ) -> Iterator[tuple[Piece, samples.PieceSamples]]:
        """(piece, samples) of each piece cut by samples.cut_piece with the generator seeded by
        (seed, record, piece number), in order; with `table` (NPMI per k-mer code) first copied
        into the arena, else the NPMI values are whatever it holds. The arrays are views of the
        arena, valid until the next piece is taken."""
        if table is not None:
            self.set_table(table)
        names = set(valid_records)
        tasks = ((p, (seed, p.record, p.index, valid_fraction, p.name in names)) for p in pieces)
        arena = self.arena
        for p, slot, (nt, ns, dropped, non_acgt) in self.map("cut", tasks):
            yield p, samples.PieceSamples(tokens=arena.view(slot, "tokens", nt),
                                          npmi=arena.view(slot, "npmi", nt),
                                          lengths=arena.view(slot, "lengths", ns),
                                          valid=arena.view(slot, "valid", ns),
                                          dropped=dropped, non_acgt=non_acgt)

    def set_table(self, table: np.ndarray) -> None:
        """The NPMI per k-mer code that cut and write tasks look tokens up in."""
        self.arena.table()[:] = table

    def close(self, kill: bool = False) -> None:
        for conn, proc in zip(self.conns, self.procs):
            if kill:
                proc.kill()
            else:
                try:
                    conn.send(None)
                except OSError:
                    proc.kill()
        for conn, proc in zip(self.conns, self.procs):
            proc.join()
            conn.close()
        self.conns, self.procs = [], []
