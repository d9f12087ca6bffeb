"""Running per-piece work in worker processes with nothing but small messages on the pipes.

Every array crosses between processes through one anonymous shared mapping (the arena, created
before the workers fork, so they inherit it): a piece's bases go in, its counts or tokens come
out. The pipes carry only a few integers per piece. multiprocessing.Pool pickled megabytes per
piece through helper threads that wait on the parent's GIL, which made two workers slower
than one; this runner has no helper threads.

Piece i uses arena slot i % slots and runs in this process (i % workers == 0) or in helper
i % workers - 1; at most `slots` pieces are in flight, so results come back in order and a slot
is rewritten only after the caller has consumed its previous result (callers must copy what
they keep before asking for the next). With workers == 1 everything runs in this process.
"""
from __future__ import annotations

import collections
import mmap
import multiprocessing as mp
import signal
from typing import Iterable, Iterator

import numpy as np

from cmgems.shards import NPMI_DTYPE
from preprocessing import kmers, samples
from preprocessing.fasta import Piece


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


def _count(arena: Arena, slot: int, n: int, overlap: int) -> int:
    table, non_acgt = kmers.count_table(arena.view(slot, "seq", n).tobytes(), arena.k, overlap)
    arena.view(slot, "counts")[:] = table.ravel()
    return non_acgt


def _cut(arena: Arena, slot: int, n: int, overlap: int, seed: int, record: int, index: int,
         valid_fraction: float, all_valid: bool) -> tuple[int, int, int, int]:
    rng = np.random.default_rng([seed, record, index])
    ps = samples.cut_piece(arena.view(slot, "seq", n).tobytes(), overlap, arena.k, arena.table(),
                           rng, valid_fraction, all_valid)
    nt, ns = len(ps.tokens), len(ps.lengths)
    arena.view(slot, "tokens", nt)[:] = ps.tokens
    arena.view(slot, "npmi", nt)[:] = ps.npmi
    arena.view(slot, "lengths", ns)[:] = ps.lengths
    arena.view(slot, "valid", ns)[:] = ps.valid
    return nt, ns, ps.dropped, ps.non_acgt


TASKS = {"count": _count, "cut": _cut}


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
    """Ordered map of count/cut tasks over pieces, shared by this process and workers - 1
    forked helpers: every `workers`-th piece runs here, so N workers keep N cores busy.

    As a context manager it closes the helpers on the way out, killing them if the block failed.
    """

    def __init__(self, workers: int, piece_bases: int, k: int):
        self.workers = workers
        self.arena = Arena(2 * workers, piece_bases, k)
        self.conns, self.procs = [], []
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

    def count(self, pieces: Iterable[Piece]) -> Iterator[tuple[Piece, np.ndarray, int]]:
        """(piece, n-gram counts [(k+1) * 4^k], non-ACGT symbols) of each piece, in order; the
        counts are a view of the arena, valid until the next piece is taken."""
        for p, slot, non_acgt in self.map("count", ((p, ()) for p in pieces)):
            yield p, self.arena.view(slot, "counts"), non_acgt

    def cut(self, pieces: Iterable[Piece], seed: int, valid_fraction: float,
            valid_records: Iterable[str] = (), table: np.ndarray | None = None
            ) -> Iterator[tuple[Piece, samples.PieceSamples]]:
        """(piece, samples) of each piece cut by samples.cut_piece with the generator seeded by
        (seed, record, piece number), in order; with `table` (NPMI per k-mer code) first copied
        into the arena, else the NPMI values are whatever it holds. The arrays are views of the
        arena, valid until the next piece is taken."""
        if table is not None:
            self.arena.table()[:] = table
        names = set(valid_records)
        tasks = ((p, (seed, p.record, p.index, valid_fraction, p.name in names)) for p in pieces)
        arena = self.arena
        for p, slot, (nt, ns, dropped, non_acgt) in self.map("cut", tasks):
            yield p, samples.PieceSamples(tokens=arena.view(slot, "tokens", nt),
                                          npmi=arena.view(slot, "npmi", nt),
                                          lengths=arena.view(slot, "lengths", ns),
                                          valid=arena.view(slot, "valid", ns),
                                          dropped=dropped, non_acgt=non_acgt)

    def map(self, kind: str, tasks: Iterable[tuple[Piece, tuple]]) -> Iterator[tuple[Piece, int, object]]:
        """Yield (piece, slot, result) in order for each (piece, extra args) of `tasks`."""
        pending: collections.deque = collections.deque()
        slots = self.arena.slots
        for i, (piece, extra) in enumerate(tasks):
            slot = i % slots
            self.arena.view(slot, "seq", len(piece.seq))[:] = np.frombuffer(piece.seq, np.uint8)
            args = (slot, len(piece.seq), piece.overlap, *extra)
            helper = i % self.workers - 1
            if helper < 0:      # this process's share, done now while the helpers work
                pending.append((None, piece, slot, TASKS[kind](self.arena, *args)))
            else:
                self.conns[helper].send((kind, args))
                pending.append((helper, piece, slot, None))
            if len(pending) >= slots:
                yield self._result(*pending.popleft())
        while pending:
            yield self._result(*pending.popleft())

    def _result(self, worker: int | None, piece: Piece, slot: int, value=None):
        if worker is None:
            return piece, slot, value
        try:
            ok, value = self.conns[worker].recv()
        except EOFError:
            self.procs[worker].join(1)
            code = self.procs[worker].exitcode
            if code in (-signal.SIGTERM, -signal.SIGINT):   # a signal to the whole group
                raise KeyboardInterrupt from None
            raise RuntimeError(f"preprocessing worker {worker} died (exit code {code})") from None
        if not ok:
            raise value
        return piece, slot, value

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
