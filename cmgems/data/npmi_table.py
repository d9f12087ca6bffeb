"""NPMI tables on disk: our npmi.tsv (written by preprocessing) and GeneMask's CSV.

In memory a table is a float32 array of 4^k NPMI values indexed by k-mer code (token id minus
NUM_SPECIAL), NaN where a k-mer has no score (seen fewer than the minimum count times).

npmi.tsv layout: `# key: value` parameter lines, then the header `kmer count pmi npmi rank`
(tab-separated) and one row per k-mer in vocabulary order; unscored rows leave pmi, npmi and
rank empty. Rank 1 is the highest NPMI.
"""
from __future__ import annotations

import csv
import functools
import math
from pathlib import Path

import numpy as np

from cmgems.errors import InputError
from cmgems.io import atomic_path
from cmgems.options import parse_float
from cmgems.data.tokens import K_RANGE, NUM_SPECIAL, base_codes, vocab

# |PMI_k| <= k * ln(number of n-grams) (about 180 for k = 6 and 10^13 k-mers), and
# |NPMI| <= |PMI|: a value beyond this bound is a broken table, not a score.
NPMI_LIMIT = 1000.0
TSV_COLUMNS = ("kmer", "count", "pmi", "npmi", "rank")
# GeneMask's published table (Data-A): the k-mer and its normalised DP PMI.
GENEMASK_KMER, GENEMASK_NPMI = "ngram", "norm_dp_true_pmi"


class TableError(InputError):
    """An NPMI table file that cannot be read as one for this k."""


def kmers(k: int) -> list[str]:
    return vocab(k)[NUM_SPECIAL:]


def ranks(npmi: np.ndarray) -> np.ndarray:
    """1 = highest NPMI; ties keep vocabulary order; 0 for unscored (NaN) k-mers."""
    npmi = np.asarray(npmi, dtype=np.float64)
    scored = ~np.isnan(npmi)
    order = np.flatnonzero(scored)[np.argsort(-npmi[scored], kind="stable")]
    out = np.zeros(len(npmi), dtype=np.int64)
    out[order] = np.arange(1, len(order) + 1)
    return out


def scored_fraction(npmi: np.ndarray) -> float:
    """Share of the 4^k k-mers that have a score (not NaN): PMI masking ranks the rest as ties."""
    npmi = np.asarray(npmi)
    return float(np.count_nonzero(~np.isnan(npmi)) / len(npmi)) if len(npmi) else 0.0


def _fmt(x) -> str:
    return "" if x == "" or math.isnan(x) else repr(x)


def write_table(path: str | Path, npmi: np.ndarray, counts: np.ndarray | None = None,
                pmi: np.ndarray | None = None, params: dict | None = None) -> Path:
    """Write npmi.tsv atomically for all 4^k k-mers (k inferred from len(npmi)).

    counts / pmi may be None (a table taken from elsewhere): their columns are then left empty.
    """
    npmi = np.asarray(npmi, dtype=np.float64)
    k = next((k for k in K_RANGE if 4 ** k == len(npmi)), None)
    if k is None:
        raise ValueError(f"{len(npmi)} NPMI values: not 4^k for any k in {list(K_RANGE)}")
    names = kmers(k)
    rank = ranks(npmi).tolist()
    values = npmi.tolist()       # python floats: formatting numpy scalars is ~10x slower
    cnt = [""] * len(values) if counts is None else [str(c) for c in np.asarray(counts).tolist()]
    pm = [""] * len(values) if pmi is None else np.asarray(pmi, dtype=np.float64).tolist()
    lines = [f"# k: {k}"] + [f"# {key}: {value}" for key, value in (params or {}).items()
                             if key != "k"]
    lines.append("\t".join(TSV_COLUMNS))
    lines += [f"{names[i]}\t{cnt[i]}\t{_fmt(pm[i]) if rank[i] else ''}\t{_fmt(values[i])}\t"
              f"{rank[i] or ''}" for i in range(len(values))]
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path


@functools.lru_cache(maxsize=None)
def _codes(k: int) -> dict[str, int]:
    """k-mer -> code, for tables: one dict lookup per row instead of per-base work."""
    return {w: i for i, w in enumerate(kmers(k))}


def _kmer_code(path: Path, line: int, kmer: str, k: int) -> int:
    if (code := _codes(k).get(kmer)) is not None:
        return code
    if len(kmer) != k:
        raise TableError(f"{path}:{line}: k-mer {kmer!r} has length {len(kmer)}, expected k={k}")
    codes = base_codes(kmer.upper())
    if (codes < 0).any():
        raise TableError(f"{path}:{line}: unknown k-mer {kmer!r} (only A, C, G, T allowed)")
    code = 0
    for c in codes:
        code = code * 4 + int(c)
    return code


def _float(path: Path, line: int, column: str, text: str) -> float:
    """An NPMI value: empty for an unscored k-mer, else a finite decimal number within
    +-NPMI_LIMIT (parse_float refuses '0_5', 'nan', 'inf', which float() would take)."""
    if text.strip() == "":
        return math.nan
    try:
        value = parse_float(text)
    except ValueError:
        if text.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
            raise TableError(f"{path}:{line}: column {column!r}: {text!r} is not a finite "
                             f"number (leave the field empty for a k-mer without a score)"
                             ) from None
        raise TableError(f"{path}:{line}: column {column!r}: {text!r} is not a number") from None
    if abs(value) > NPMI_LIMIT:
        raise TableError(f"{path}:{line}: column {column!r}: {text!r} is outside "
                         f"[-{NPMI_LIMIT:g}, {NPMI_LIMIT:g}], not an NPMI value of any genome's "
                         f"counts")
    return value


def load_table(path: str | Path, k: int) -> np.ndarray:
    """NPMI per k-mer code (float32 [4^k], NaN = unscored) from our TSV or GeneMask's CSV.

    K-mers the file does not list are unscored. Raises TableError naming the file and line for
    an unreadable file, unknown columns, a k-mer of the wrong length or alphabet, a duplicate
    k-mer or a non-numeric value.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")    # a spreadsheet's CSV may start with a BOM
    except (OSError, UnicodeDecodeError) as e:
        raise TableError(f"{path}: cannot read NPMI table ({e})") from None
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.strip() and not ln.startswith("#")), None)
    if start is None:
        raise TableError(f"{path}: empty NPMI table (no header line)")
    header_line = lines[start]
    delim = "\t" if "\t" in header_line else ","
    header = [h.strip().strip('"') for h in next(csv.reader([header_line], delimiter=delim))]
    if "kmer" in header and "npmi" in header:
        key_col, val_col = header.index("kmer"), header.index("npmi")
    elif GENEMASK_KMER in header and GENEMASK_NPMI in header:
        key_col, val_col = header.index(GENEMASK_KMER), header.index(GENEMASK_NPMI)
    else:
        raise TableError(f"{path}:{start + 1}: unknown NPMI table columns {header}; expected "
                         f"{'/'.join(TSV_COLUMNS)} (tab-separated, as preprocessing writes) or "
                         f"GeneMask's CSV with {GENEMASK_KMER!r} and {GENEMASK_NPMI!r}")
    table = np.full(4 ** k, np.nan, dtype=np.float32)
    seen = np.zeros(4 ** k, dtype=bool)
    rows = csv.reader(lines[start + 1:], delimiter=delim)
    for offset, row in enumerate(rows):
        line = start + 2 + offset
        if not row or (len(row) == 1 and not row[0].strip()) or row[0].startswith("#"):
            continue
        if len(row) <= max(key_col, val_col):
            raise TableError(f"{path}:{line}: {len(row)} columns, header has {len(header)}")
        code = _kmer_code(path, line, row[key_col].strip().strip('"'), k)
        if seen[code]:
            raise TableError(f"{path}:{line}: k-mer {row[key_col]!r} listed twice")
        seen[code] = True
        table[code] = _float(path, line, header[val_col], row[val_col])
    if not seen.any():
        raise TableError(f"{path}: NPMI table lists no k-mers")
    return table


def npmi_of_ids(table, ids):
    """NPMI of each token id (vectorized lookup); NaN for special tokens and out-of-range ids.

    `ids` may be a numpy array (float32 array back) or a torch tensor (float32 tensor back, on
    the ids' device; pass the table as a tensor there to avoid a copy per call).
    """
    if hasattr(ids, "device") and hasattr(ids, "masked_fill"):   # torch, without importing it
        import torch
        t = torch.as_tensor(table, dtype=torch.float32, device=ids.device)
        code = ids.long() - NUM_SPECIAL
        ok = (code >= 0) & (code < t.numel())
        return t[code.clamp(0, t.numel() - 1)].masked_fill(~ok, float("nan"))
    table = np.asarray(table, dtype=np.float32)
    code = np.asarray(ids, dtype=np.int64) - NUM_SPECIAL
    ok = (code >= 0) & (code < len(table))
    return np.where(ok, table[np.clip(code, 0, len(table) - 1)], np.float32(np.nan))
