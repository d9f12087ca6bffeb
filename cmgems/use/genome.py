"""Sequences to run a model on: the records of a FASTA file, or BED regions of an indexed genome.

The genome is read with pyfaidx (random access: only the bases of each region are read), from a
plain FASTA or a bgzip-compressed one; the .fai (and .gzi) index is built beside it when absent.
Plain gzip has no random access and is refused with a message naming bgzip. Every refusal is an
InputError naming the file and line.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmgems.errors import InputError

_COMPLEMENT = bytes.maketrans(b"ACGTNacgtnRYSWKMBDHVryswkmbdhv",
                              b"TGCANtgcanYRSWMKVHDByrswmkvhdb")
# Symbols a sequence may hold: the nucleotides, IUPAC ambiguity codes, RNA's U and a gap
_ALLOWED = np.zeros(256, dtype=bool)
for _b in b"ACGTNRYSWKMBDHVU-acgtnryswkmbdhvu-":
    _ALLOWED[_b] = True
_ACGT = np.zeros(256, dtype=bool)
for _b in b"ACGTacgt":
    _ACGT[_b] = True


@dataclass(frozen=True)
class Region:
    """One sequence to run the model on: its name (the FASTA id, or chrom:start-end(strand)) and
    its bases, upper case, reverse-complemented already for a '-' strand."""
    name: str
    seq: str


def reverse_complement(seq: str) -> str:
    return seq.encode("ascii").translate(_COMPLEMENT)[::-1].decode("ascii")


def _bad_symbol(line: bytes) -> int | None:
    """0-based column of the first symbol that is no nucleotide code, or None."""
    bad = np.flatnonzero(~_ALLOWED[np.frombuffer(line, dtype=np.uint8)])
    return int(bad[0]) if len(bad) else None


def has_bases(seq: str) -> bool:
    return bool(_ACGT[np.frombuffer(seq.encode("ascii"), dtype=np.uint8)].any())


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _is_bgzf(path: Path) -> bool:
    """A BGZF file: gzip members whose extra field holds the 'BC' subfield (SAM spec, 4.1)."""
    with open(path, "rb") as f:
        head = f.read(18)
    return len(head) == 18 and head[3] & 4 != 0 and head[12:14] == b"BC"


def read_fasta(path: str | Path, min_length: int = 1) -> list[Region]:
    """Every record of a FASTA file (plain or gzip), upper case. Refused, with the line: text
    before the first header, a header without id, a symbol that is no nucleotide code, a record
    with no bases or shorter than `min_length`, a file without records."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    opener = gzip.open if _is_gzip(path) else open
    records: list[Region] = []
    name, start, parts = None, 0, []

    def close(lineno: int) -> None:
        seq = b"".join(parts).decode("ascii").upper()
        if len(seq) < min_length:
            raise InputError(f"{path}, line {start}: record {name!r} has {len(seq)} bases; at "
                             f"least {min_length} are needed (one k-mer)")
        if not has_bases(seq):
            raise InputError(f"{path}, line {start}: record {name!r} holds no A, C, G or T "
                             f"(only N or other unknown bases): nothing to embed")
        records.append(Region(name, seq))

    try:
        with opener(path, "rb") as f:
            lineno = 0
            for lineno, raw in enumerate(f, 1):
                line = raw.rstrip(b"\r\n")
                if line.startswith(b">"):
                    if name is not None:
                        close(lineno)
                    fields = line[1:].split()
                    if not fields:
                        raise InputError(f"{path}, line {lineno}: header without an id")
                    name, start, parts = fields[0].decode("utf-8", "replace"), lineno, []
                    continue
                line = line.strip()
                if not line or line.startswith(b";"):
                    continue
                if name is None:
                    raise InputError(f"{path}, line {lineno}: sequence before the first '>' "
                                     f"header: not a FASTA file")
                col = _bad_symbol(line)
                if col is not None:
                    raise InputError(f"{path}, line {lineno}, column {col + 1}: "
                                     f"{chr(line[col])!r} is not a nucleotide code")
                parts.append(line)
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({e})") from None
    if name is None:
        raise InputError(f"{path}: no FASTA records (no '>' header)")
    close(lineno)
    return records


class Genome:
    """Random access to an indexed FASTA (pyfaidx), plain or bgzip-compressed."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"{self.path}: no such file")
        if _is_gzip(self.path) and not _is_bgzf(self.path):
            raise InputError(
                f"{self.path}: plain gzip, which has no random access; recompress it with "
                f"bgzip (`zcat {self.path.name} | bgzip > {self.path.name[:-3]}.bgz`, bgzip is in "
                f"htslib) or decompress it (`gunzip -k {self.path.name}`)")
        index = Path(str(self.path) + ".fai")
        if not index.is_file() and not os.access(self.path.parent, os.W_OK):
            raise InputError(f"{self.path}: no index {index.name} beside it and the folder is not "
                             f"writable to build one; run `samtools faidx {self.path}` where it "
                             f"can be written, or copy the genome into a writable folder")
        try:
            import pyfaidx
        except ImportError:  # pragma: no cover - a dependency of the package
            raise InputError("reading a genome needs pyfaidx (pip install pyfaidx)") from None
        try:
            # one_based_attributes off, read_ahead off: each region reads its own bases only
            self._fasta = pyfaidx.Fasta(str(self.path), sequence_always_upper=True,
                                        as_raw=True, build_index=True, rebuild=False)
        except ImportError as e:
            raise InputError(f"{self.path}: reading bgzip-compressed FASTA needs biopython "
                             f"(pip install biopython): {e}") from None
        except (pyfaidx.FastaIndexingError, ValueError, OSError, RuntimeError) as e:
            raise InputError(f"{self.path}: cannot index as FASTA ({' '.join(str(e).split())})") \
                from None
        self.lengths = {name: len(rec) for name, rec in self._fasta.items()}

    def fetch(self, chrom: str, start: int, end: int) -> str:
        """Bases [start, end) of `chrom` (0-based, half-open), upper case."""
        return self._fasta[chrom][start:end]

    def close(self) -> None:
        self._fasta.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def unknown_contig(self, where: str, chrom: str) -> InputError:
        names = list(self.lengths)
        shown = ", ".join(names[:5]) + (f" ... ({len(names)} in all)" if len(names) > 5 else "")
        return InputError(f"{where}: contig {chrom!r} is not in {self.path.name} ({shown})")


def _bed_fields(path: Path, lineno: int, line: str) -> tuple[str, int, int, str]:
    fields = line.split("\t") if "\t" in line else line.split()
    where = f"{path}, line {lineno}"
    if len(fields) < 3:
        raise InputError(f"{where}: {len(fields)} columns; BED needs chrom, start, end "
                         f"(then optional name, score, strand)")
    chrom = fields[0].strip()
    try:
        start, end = int(fields[1]), int(fields[2])
    except ValueError:
        raise InputError(f"{where}: start {fields[1]!r} and end {fields[2]!r} must be integers") \
            from None
    if start < 0 or end <= start:
        raise InputError(f"{where}: region {start}-{end} is empty or negative; BED is 0-based "
                         f"half-open, 0 <= start < end")
    strand = fields[5].strip() if len(fields) > 5 else "."
    if strand not in ("+", "-", "."):
        raise InputError(f"{where}: strand {strand!r} in column 6 is not +, - or .")
    return chrom, start, end, strand


def read_bed(path: str | Path, genome: Genome, min_length: int = 1) -> list[Region]:
    """The regions of a BED file (0-based half-open; optional name, score, strand columns; '-'
    is reverse-complemented), read from `genome`. Refused with the BED line: too few columns,
    non-integer or empty coordinates, a bad strand, an unknown contig, a region running off its
    contig, one shorter than `min_length`, one holding no A/C/G/T."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    regions: list[Region] = []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({e})") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith(("#", "track", "browser")):
            continue
        chrom, start, end, strand = _bed_fields(path, lineno, line)
        where = f"{path}, line {lineno}"
        if chrom not in genome.lengths:
            raise genome.unknown_contig(where, chrom)
        length = genome.lengths[chrom]
        if end > length:
            raise InputError(f"{where}: region {chrom}:{start}-{end} runs off the contig, "
                             f"which has {length} bases")
        if end - start < min_length:
            raise InputError(f"{where}: region {chrom}:{start}-{end} has {end - start} bases; "
                             f"at least {min_length} are needed (one k-mer)")
        seq = genome.fetch(chrom, start, end)
        if not has_bases(seq):
            raise InputError(f"{where}: region {chrom}:{start}-{end} holds only N (no A, C, G "
                             f"or T): nothing to embed")
        if strand == "-":
            seq = reverse_complement(seq)
        regions.append(Region(f"{chrom}:{start}-{end}({strand})", seq))
    if not regions:
        raise InputError(f"{path}: no regions")
    return regions


def load_inputs(fasta: str | Path | None, genome: str | Path | None, bed: str | Path | None,
                min_length: int) -> list[Region]:
    """The sequences a command runs on: --fasta's records, or --bed's regions of --genome."""
    if (fasta is None) == (genome is None and bed is None):
        raise InputError("give either --fasta SEQS.fa, or --genome G.fa with --bed R.bed")
    if fasta is not None:
        return read_fasta(fasta, min_length)
    if genome is None or bed is None:
        raise InputError("--genome and --bed go together")
    with Genome(genome) as g:
        return read_bed(bed, g, min_length)
