"""Variant effect scores from the masked-LM head: the masked-marginal score of each SNV.

In a window of the genome centred on the variant, every k-mer token that covers the variant's
base is masked (so no unmasked token holds the variant's base: the context is the same whether
the genome carries REF or ALT); the score is the sum over those positions of
log P(ALT's k-mer) - log P(REF's k-mer). It is 0 for ALT = REF, and scoring the reverse change on
a genome that carries ALT gives the same score with the opposite sign.

A REF that does not match the genome is reported on its row (score NA) rather than scored; indels
and other non-SNV records are skipped and counted.
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cmgems.data.tokens import CLS_ID, MASK_ID, SEP_ID, kmer_ids
from cmgems.errors import InputError
from cmgems.io import atomic_path
from cmgems.use.genome import Genome
from cmgems.use.windows import LoadedModel, autocast, progress_bar

COLUMNS = ("chrom", "pos", "ref", "alt", "score", "window", "note")
BASES = frozenset("ACGT")


@dataclass
class Variant:
    chrom: str
    pos: int          # 1-based, as VCF
    ref: str
    alt: str
    line: int


@dataclass
class VcfRecords:
    snvs: list[Variant] = field(default_factory=list)
    skipped: int = 0  # indels, symbolic and other non-SNV alleles


def read_vcf(path: str | Path, genome: Genome) -> VcfRecords:
    """The SNVs of a VCF (plain, gzip or bgzip); one row per ALT allele. Refused with the line:
    fewer than 5 columns, a POS that is no positive integer, an unknown contig, a POS past its end."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    with open(path, "rb") as f:
        opener = gzip.open if f.read(2) == b"\x1f\x8b" else open
    out = VcfRecords()
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if not line.strip() or line.startswith("#"):
                    continue
                cols = line.split("\t")
                where = f"{path}, line {lineno}"
                if len(cols) < 5:
                    raise InputError(f"{where}: {len(cols)} tab-separated columns; a VCF record "
                                     f"has at least CHROM, POS, ID, REF, ALT")
                chrom, pos, ref, alts = cols[0], cols[1], cols[3].upper(), cols[4].upper()
                try:
                    pos = int(pos)
                except ValueError:
                    raise InputError(f"{where}: POS {pos!r} is not an integer") from None
                if pos < 1:
                    raise InputError(f"{where}: POS {pos} must be >= 1 (VCF is 1-based)")
                if chrom not in genome.lengths:
                    raise genome.unknown_contig(where, chrom)
                if pos + len(ref) - 1 > genome.lengths[chrom]:
                    raise InputError(f"{where}: {chrom}:{pos} lies past the end of the contig "
                                     f"({genome.lengths[chrom]} bases)")
                for alt in alts.split(","):
                    if len(ref) == 1 and len(alt) == 1 and ref in BASES and alt in BASES:
                        out.snvs.append(Variant(chrom, pos, ref, alt, lineno))
                    else:
                        out.skipped += 1
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({e})") from None
    return out


def _window(genome: Genome, v: Variant, span: int) -> tuple[int, int]:
    """[start, end) of `span` bases centred on the variant, moved inside the contig."""
    length = genome.lengths[v.chrom]
    start = min(max(v.pos - 1 - span // 2, 0), max(length - span, 0))
    return start, min(start + span, length)


def score_variants(loaded: LoadedModel, genome: Genome, snvs: list[Variant], *,
                   batch_size: int = 32, progress: bool = True) -> list[dict]:
    """One row (COLUMNS) per SNV, in input order."""
    import torch
    k, span = loaded.k, loaded.window + loaded.k - 1
    rows, inputs = [], []  # inputs: (row index, ids, masked positions, ref ids, alt ids)
    for v in snvs:
        start, end = _window(genome, v, span)
        seq = genome.fetch(v.chrom, start, end)
        at = v.pos - 1 - start
        row = {"chrom": v.chrom, "pos": v.pos, "ref": v.ref, "alt": v.alt, "score": "NA",
               "window": f"{v.chrom}:{start}-{end}", "note": ""}
        rows.append(row)
        if seq[at] != v.ref:
            row["note"] = f"ref_mismatch: the genome has {seq[at]}"
            continue
        if end - start < k:
            row["note"] = f"contig shorter than one {k}-mer"
            continue
        ids = kmer_ids(seq, k)
        covering = np.arange(max(at - k + 1, 0), min(at, len(ids) - 1) + 1)
        alt_ids = kmer_ids(seq[:at] + v.alt + seq[at + 1:], k)
        inputs.append((len(rows) - 1, ids, covering, ids[covering], alt_ids[covering]))
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i][1]))
    # inference mode: no autograd graph is built or kept
    with torch.inference_mode(), \
            progress_bar(len(inputs), "score-variants", "variant", progress) as bar:
        for b in range(0, len(order), batch_size):
            chunk = [inputs[i] for i in order[b:b + batch_size]]
            width = max(len(c[1]) for c in chunk) + 2
            ids = np.zeros((len(chunk), width), dtype=np.int64)
            ref_t = np.zeros_like(ids)
            alt_t = np.zeros_like(ids)
            masked = np.zeros(ids.shape, dtype=bool)
            for r, (_, tok, cov, ref_ids, alt_ids) in enumerate(chunk):  # slice copies per row
                ids[r, 0], ids[r, 1:len(tok) + 1], ids[r, len(tok) + 1] = CLS_ID, tok, SEP_ID
                ids[r, cov + 1] = MASK_ID
                masked[r, cov + 1] = True
                ref_t[r, cov + 1], alt_t[r, cov + 1] = ref_ids, alt_ids
            ids_t = torch.from_numpy(ids).to(loaded.device)
            with autocast(loaded):
                logits = loaded.model(input_ids=ids_t, attention_mask=(ids_t != 0).long()).logits
            logp = torch.log_softmax(logits.double(), dim=-1)
            ref_lp = logp.gather(-1, torch.from_numpy(ref_t).to(logp.device)[..., None])[..., 0]
            alt_lp = logp.gather(-1, torch.from_numpy(alt_t).to(logp.device)[..., None])[..., 0]
            m = torch.from_numpy(masked).to(logp.device)
            scores = torch.where(m, alt_lp - ref_lp, torch.zeros_like(alt_lp)).sum(1).cpu()
            for (row, *_), s in zip(chunk, scores.tolist()):
                rows[row]["score"] = f"{s:.6g}"
            bar.update(len(chunk))
    return rows


def write_scores(out: str | Path, rows: list[dict]) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(COLUMNS)] + ["\t".join(str(r[c]) for c in COLUMNS) for r in rows]
    with atomic_path(out) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return out
