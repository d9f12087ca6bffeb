"""Streaming FASTA reader: compressions, layouts, skipped records and every bad-input case."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from preprocessing.fasta import FastaError, FastaReader

RECORDS = {"chr1": "ACGTNNacgtRYACGT" * 40, "empty": "", "tiny": "ACGTA", "chr2": "GATTACA" * 101}


def _fasta(records: dict[str, str], width: int, newline: str = "\n") -> str:
    out = []
    for name, seq in records.items():
        out.append(f">{name} some description{newline}")
        if width:
            out += [seq[i:i + width] + newline for i in range(0, len(seq), width)]
        elif seq:
            out.append(seq + newline)
    return "".join(out)


def _read(path: Path, piece=50, overlap=5, min_bases=10):
    reader = FastaReader(path, piece, overlap, min_bases)
    pieces = list(reader)
    seqs: dict[str, str] = {}
    for p in pieces:
        seqs[p.name] = seqs.get(p.name, "") + p.seq.decode()[p.overlap:]
        assert len(p.seq) < piece + overlap
    return seqs, reader.stats, pieces


def _write(path: Path, text: str, compression: str) -> Path:
    data = text.encode()
    if compression == "gzip":
        path.write_bytes(gzip.compress(data))
    elif compression == "bgzip":
        bgzf = pytest.importorskip("Bio.bgzf")
        with bgzf.BgzfWriter(str(path), "wb") as f:
            # small blocks so the reader crosses many gzip members
            for i in range(0, len(data), 300):
                f.write(data[i:i + 300])
                f.flush()
    else:
        path.write_bytes(data)
    return path


@pytest.mark.parametrize("compression", ["plain", "gzip", "bgzip"])
@pytest.mark.parametrize("width,newline", [(60, "\n"), (1, "\n"), (0, "\n"), (17, "\r\n")])
def test_reads_every_layout(tmp_path, compression, width, newline):
    path = _write(tmp_path / "g.fa", _fasta(RECORDS, width, newline), compression)
    seqs, st, pieces = _read(path)
    assert seqs == {"chr1": RECORDS["chr1"], "chr2": RECORDS["chr2"]}
    assert st.records == 4 and st.empty_records == 1 and st.short_records == 1
    assert st.short_record_bases == 5 and st.bases == sum(map(len, RECORDS.values()))
    assert st.names == list(RECORDS)
    # consecutive pieces of a record overlap by exactly `overlap` bases
    for a, b in zip(pieces, pieces[1:]):
        if a.record == b.record:
            assert b.index == a.index + 1 and b.overlap == 5 and a.seq[-5:] == b.seq[:5]


def test_large_pieces_from_a_single_line_record(tmp_path):
    rng = np.random.default_rng(0)
    seq = "".join(rng.choice(list("ACGT"), 300_000))
    path = _write(tmp_path / "one.fa.gz", f">x\n{seq}", "gzip")   # no final newline
    seqs, st, pieces = _read(path, piece=65_536, overlap=5)
    assert seqs["x"] == seq and len(pieces) == 5


def test_no_final_newline_after_header(tmp_path):
    path = _write(tmp_path / "g.fa", ">a\nACGTACGTACGT\n>b", "plain")
    seqs, st, _ = _read(path)
    assert seqs == {"a": "ACGTACGTACGT"} and st.records == 2 and st.empty_records == 1


def _random_gz() -> bytes:
    seq = np.random.default_rng(0).choice(np.frombuffer(b"ACGT", np.uint8), 50_000).tobytes()
    return gzip.compress(b">a\n" + seq + b"\n")


@pytest.mark.parametrize("make, fragment", [
    (lambda p: p.write_text(""), "empty file"),
    (lambda p: p.write_text("\n\n  \n"), "empty file"),
    (lambda p: p.write_text("\nACGT\n>a\nACGT\n"), ":2: not FASTA: sequence before the first '>'"),
    (lambda p: p.write_text("name,value\nfoo,1\n"), ":1: not FASTA"),
    (lambda p: p.write_bytes(b">a\nACGT\nAC\x9f\x00GT\n"), ":3: not FASTA (byte 0x9f"),
    (lambda p: p.write_bytes(_random_gz()[:-100]), "truncated gzip"),
    (lambda p: p.write_bytes(_random_gz()[:-4]), "truncated gzip"),
    (lambda p: p.write_bytes(b"\x1f\x8b\x08\x00garbage-not-deflate" * 10), "corrupt gzip"),
    (lambda p: None, "cannot read genome"),
    (lambda p: p.mkdir(), "cannot read genome"),
])
def test_bad_inputs_raise_one_clear_error(tmp_path, make, fragment):
    path = tmp_path / "bad.fa"
    make(path)
    with pytest.raises(FastaError) as e:
        list(FastaReader(path, 1000, 5, 10))
    assert str(path) in str(e.value) and fragment in str(e.value)


# ---- compressed files: every byte accounted for ----

def _members(*texts: bytes) -> bytes:
    return b"".join(gzip.compress(t) for t in texts)


def _bgzf(tmp_path: Path, text: bytes) -> bytes:
    path = _write(tmp_path / "b.fa.gz", text.decode(), "bgzip")
    return path.read_bytes()


A, B = b">a\n" + b"ACGT" * 500 + b"\n", b">b\n" + b"GATTACA" * 300 + b"\n"


def test_concatenated_gzip_members_are_one_file(tmp_path):
    path = tmp_path / "cat.fa.gz"
    path.write_bytes(_members(A, B))          # cat a.gz b.gz > cat.fa.gz
    seqs, st, _ = _read(path, piece=1000)
    assert seqs == {"a": "ACGT" * 500, "b": "GATTACA" * 300} and st.records == 2


def test_output_capped_exactly_at_the_end_of_the_input(tmp_path):
    """Highly compressible members: zlib still holds output when the file's bytes run out."""
    from preprocessing import fasta
    text = b">a\n" + b"A" * (3 * fasta.BLOCK_BYTES - 3) + b"\n"
    path = tmp_path / "runs.fa.gz"
    path.write_bytes(_members(text, text.replace(b">a", b">b")))
    reader = FastaReader(path, 1 << 20, 5, 10)
    assert sum(len(p.seq) - p.overlap for p in reader) == 2 * (3 * fasta.BLOCK_BYTES - 3)


def _flip(blob: bytes, at: int) -> bytes:
    return blob[:at] + bytes([blob[at] ^ 0xFF]) + blob[at + 1:]


@pytest.mark.parametrize("make, fragment", [
    # junk after the last member: a silent end of the genome before
    (lambda tmp: _members(A, B) + b"trailing junk\n",
     lambda blob: f"14 bytes at byte {len(blob) - 14} that are not gzip data"),
    # junk between two members: the second member's records were silently dropped
    (lambda tmp: _members(A) + b"XYZ" + _members(B),
     lambda blob: f"bytes at byte {len(gzip.compress(A))} that are not gzip data"),
    (lambda tmp: _members(A) + b"\x00" * 512,
     lambda blob: f"512 bytes at byte {len(gzip.compress(A))} that are not gzip data"),
    # a damaged block of a BGZF file (flipped byte inside the compressed data)
    (lambda tmp: _flip(_bgzf(tmp, A + B), 400), lambda blob: "corrupt gzip member at byte"),
    # a BGZF file cut at a block boundary: its end-of-file block is missing
    (lambda tmp: _bgzf(tmp, A + B)[:-28],
     lambda blob: f"BGZF file without its end-of-file block at byte {len(blob)}"),
    (lambda tmp: _members(A)[:-8], lambda blob: f"truncated gzip file (ends at byte {len(blob)}"),
])
def test_compressed_bytes_not_accounted_for_are_refused(tmp_path, make, fragment):
    blob = make(tmp_path)
    path = tmp_path / "bad.fa.gz"
    path.write_bytes(blob)
    with pytest.raises(FastaError) as e:
        list(FastaReader(path, 1000, 5, 10))
    assert str(e.value).startswith(f"{path}: ") and fragment(blob) in str(e.value), str(e.value)


def test_damaged_bgzf_block_names_its_offset(tmp_path):
    blob = _bgzf(tmp_path, A + B)
    # the blocks' offsets, from their BSIZE fields
    starts, at = [], 0
    while at < len(blob):
        starts.append(at)
        at += int.from_bytes(blob[at + 16:at + 18], "little") + 1
    assert len(starts) > 3
    path = tmp_path / "bad.fa.gz"
    path.write_bytes(_flip(blob, starts[2] + 30))
    with pytest.raises(FastaError, match=f"corrupt gzip member at byte {starts[2]} "):
        list(FastaReader(path, 1000, 5, 10))


def test_a_named_pipe_is_refused_up_front(tmp_path):
    import os
    fifo = tmp_path / "genome.fa"
    os.mkfifo(fifo)
    with pytest.raises(FastaError, match="a named pipe"):   # no writer: a hang before
        list(FastaReader(fifo, 1000, 5, 10))
