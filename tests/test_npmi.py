"""n-gram counts, PMI/NPMI against brute force, and NPMI table files (ours and GeneMask's)."""
from __future__ import annotations

import csv
import itertools
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cmgems.data import npmi_table
from cmgems.data.tokens import NUM_SPECIAL
from preprocessing import kmers, npmi
from preprocessing.fasta import FastaReader
from conftest import shared_file

GENEMASK = "npmi/hg38_6mer_npmi_genemask.csv"  # GeneMask's published table, where present


def _code(s: str) -> int:
    c = 0
    for ch in s:
        c = c * 4 + "ATCG".index(ch)
    return c


def _brute_counts(seqs: list[str], k: int) -> list[Counter]:
    out = [Counter() for _ in range(k + 1)]
    for seq in seqs:
        for run in "".join(ch if ch in "ACGT" else " " for ch in seq.upper()).split():
            for n in range(1, k + 1):
                out[n].update(run[i:i + n] for i in range(len(run) - n + 1))
    return out


def _genome(tmp_path: Path, seed: int = 0) -> tuple[Path, list[str]]:
    rng = np.random.default_rng(seed)
    seqs = []
    for length in (3000, 45, 1777):
        # a biased alphabet so PMI values vary; N and lower case break / keep windows
        s = rng.choice(list("AACGTTTacgN"), length)
        seqs.append("".join(s))
    path = tmp_path / "g.fa"
    path.write_text("".join(f">r{i}\n" + "\n".join(s[j:j + 61] for j in range(0, len(s), 61)) + "\n"
                            for i, s in enumerate(seqs)))
    return path, seqs


@pytest.mark.parametrize("k", [3, 4, 6])
def test_counts_over_pieces_equal_brute_force(tmp_path, k):
    path, seqs = _genome(tmp_path, k)
    # small pieces: many cuts with overlaps, each must count every n-gram exactly once
    table = sum(kmers.count_table(p.seq, k, p.overlap)[0]
                for p in FastaReader(path, piece_bases=97, overlap=k - 1, min_bases=1))
    counts = kmers.ngram_counts(table, k)
    want = _brute_counts(seqs, k)
    for n in range(1, k + 1):
        expect = np.zeros(4 ** n, dtype=np.int64)
        for w, c in want[n].items():
            expect[_code(w)] = c
        assert np.array_equal(counts[n], expect), n


def _counts(path: Path, k: int) -> list[np.ndarray]:
    pieces = FastaReader(path, 1000, k - 1, 1)
    return kmers.ngram_counts(sum(kmers.count_table(p.seq, k, p.overlap)[0] for p in pieces), k)


def _brute_pmi(counts, k):
    """levine: min over every segmentation into >= 2 parts, enumerated with itertools."""
    logp = {n: np.log(counts[n] / counts[n].sum()) for n in range(1, k + 1)}
    out = np.empty(4 ** k)
    for c, w in enumerate("".join(p) for p in itertools.product("ATCG", repeat=k)):
        best = math.inf
        for r in range(1, k):
            for cuts in itertools.combinations(range(1, k), r):
                bounds = (0,) + cuts + (k,)
                parts = sum(logp[b - a][_code(w[a:b])] for a, b in zip(bounds, bounds[1:]))
                best = min(best, logp[k][c] - parts)
        out[c] = best
    return out


@pytest.mark.parametrize("k", [3, 4])
def test_levine_pmi_equals_brute_force_segmentations(tmp_path, k):
    path, _ = _genome(tmp_path, 7)
    counts = _counts(path, k)
    assert (counts[k] > 0).all()     # every k-mer seen: PMI defined everywhere
    with np.errstate(divide="ignore"):
        want = _brute_pmi(counts, k)
    got = npmi.pmi(counts, k, "levine")
    assert np.allclose(got, want, rtol=0, atol=1e-12)

    c = 20
    p, n = npmi.npmi(counts, k, c, definition="levine")
    f = counts[k]
    assert np.isnan(n[f < c]).all() and not np.isnan(n[f >= c]).any()
    sel = f >= c
    assert np.allclose(n[sel], want[sel] * np.log(f[sel]) / (np.log(c) + np.log(f[sel])))


def _compositions(k: int, lengths: tuple[int, ...]):
    if k == 0:
        yield ()
    for n in lengths:
        if n <= k:
            for rest in _compositions(k - n, lengths):
                yield (n,) + rest


def _brute_genemask(seqs: list[str], k: int) -> np.ndarray:
    """genemask in plain Python from string counts: min over segmentations into parts of length
    1 and 2, every probability against the number of 1-grams plus 2-grams counted."""
    f = _brute_counts(seqs, k)
    total = sum(f[1].values()) + sum(f[2].values())
    out = np.full(4 ** k, np.nan)
    for w in ("".join(p) for p in itertools.product("ATCG", repeat=k)):
        if not f[k][w]:
            continue
        best = math.inf
        for parts in _compositions(k, (1, 2)):
            bounds = list(itertools.accumulate(parts, initial=0))
            split = sum(math.log(f[b - a][w[a:b]] / total) for a, b in zip(bounds, bounds[1:]))
            best = min(best, math.log(f[k][w] / total) - split)
        out[_code(w)] = best
    return out


@pytest.mark.parametrize("k", [3, 4, 6])
def test_genemask_pmi_equals_brute_force_segmentations(tmp_path, k):
    path, seqs = _genome(tmp_path, 11)
    counts = _counts(path, k)
    want = _brute_genemask(seqs, k)
    got = npmi.pmi(counts, k, "genemask")
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert (k == 6) == bool(np.isnan(want).any())     # some 6-mers unseen in ~4,800 bases
    assert np.allclose(got, want, rtol=0, atol=1e-12, equal_nan=True)
    # the default definition is genemask
    assert np.array_equal(npmi.pmi(counts, k), got, equal_nan=True)

    c = 5
    p, n = npmi.npmi(counts, k, c)
    f = counts[k]
    assert np.isnan(n[f < c]).all() and not np.isnan(n[f >= c]).any()
    sel = f >= c
    assert np.allclose(n[sel], want[sel] * np.log(f[sel]) / (np.log(c) + np.log(f[sel])))


def _ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x, kind="stable"), kind="stable")


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def test_genemask_definition_reproduces_published_table():
    """Counts rebuilt from the table itself: norm/dp = log f / (log f + log 101) gives each
    6-mer's count f; a shorter n-gram's count is the sum over the 6-mers it begins."""
    with shared_file(GENEMASK).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    k, c = 6, 101
    code = np.array([_code(r["ngram"]) for r in rows])
    dp = np.array([float(r["dp.true.pmi"]) for r in rows])
    norm = np.array([float(r["norm_dp_true_pmi"]) for r in rows])
    ratio = norm / dp
    f = np.zeros(4 ** k, dtype=np.int64)
    f[code] = np.rint(np.exp(ratio * np.log(c) / (1 - ratio)))
    assert len(set(code)) == 4 ** k and f.min() >= c
    counts = [np.zeros(1, dtype=np.int64)]
    counts += [f.reshape(4 ** n, -1).sum(axis=1) for n in range(1, k + 1)]

    p, n = npmi.npmi(counts, k, c, definition="genemask")
    for got, want in ((p[code], dp), (n[code], norm)):
        assert np.abs(got - want).max() <= 0.005
        assert _spearman(got, want) >= 0.999
    # the other definition, on the same counts, is a different ranking
    _, levine = npmi.npmi(counts, k, c, definition="levine")
    assert _spearman(levine[code], norm) < 0.95


@pytest.mark.parametrize("definition", npmi.DEFINITIONS)
def test_unseen_kmers_have_no_score(definition):
    k = 3
    counts = kmers.ngram_counts(kmers.count_table(b"AAAAAAAACCCCCCCACACACA", k, 0)[0], k)
    p, n = npmi.npmi(counts, k, 1, definition)
    assert np.isnan(n[_code("GGG")]) and np.isnan(p[_code("GGG")])
    assert np.isnan(n[_code("ACG")]) and np.isnan(p[_code("ACG")])    # parts seen, k-mer not
    assert not np.isnan(n[_code("AAA")])
    assert not np.isinf(p).any() and not np.isinf(n).any()


@pytest.mark.parametrize("definition", npmi.DEFINITIONS)
def test_nothing_counted_scores_nothing(definition):
    counts = [np.zeros(4 ** n, dtype=np.int64) for n in range(4)]
    p, n = npmi.npmi(counts, 3, 1, definition)
    assert np.isnan(p).all() and np.isnan(n).all()


def test_bad_definition_and_min_count_are_refused():
    counts = kmers.ngram_counts(kmers.count_table(b"ACGTACGTAC", 3, 0)[0], 3)
    with pytest.raises(ValueError, match="unknown NPMI definition 'dp'"):
        npmi.npmi(counts, 3, 1, "dp")
    with pytest.raises(ValueError, match="min_count must be >= 1"):
        npmi.npmi(counts, 3, 0)


def test_table_round_trip_and_ranks(tmp_path):
    rng = np.random.default_rng(1)
    values = rng.normal(size=4 ** 4)
    values[[3, 50, 200]] = np.nan
    counts = rng.integers(0, 1000, 4 ** 4)
    path = npmi_table.write_table(tmp_path / "t.tsv", values, counts, values * 2, {"min_count": 7})
    text = path.read_text().splitlines()
    assert "# min_count: 7" in text and "kmer\tcount\tpmi\tnpmi\trank" in text
    rows = [ln.split("\t") for ln in text if not ln.startswith("#")][1:]
    assert [r[0] for r in rows] == npmi_table.kmers(4)
    assert rows[3][2:] == ["", "", ""]
    best = int(np.nanargmax(values))
    assert rows[best][4] == "1"
    loaded = npmi_table.load_table(path, 4)
    assert loaded.dtype == np.float32
    assert np.array_equal(np.isnan(loaded), np.isnan(values))
    assert np.allclose(loaded[~np.isnan(values)], values[~np.isnan(values)].astype(np.float32))


def test_genemask_csv_loads():
    table = npmi_table.load_table(shared_file(GENEMASK), 6)
    assert table.shape == (4096,) and not np.isnan(table).any()
    assert table[_code("CCTCCC")] == pytest.approx(2.1030761926846298)
    assert int(np.argmax(table)) == _code("CCTCCC")


@pytest.mark.parametrize("content, fragment", [
    ("a,b\nAAA,1\n", ":1: unknown NPMI table columns"),
    ("kmer\tnpmi\nAAA\t0.5\nAAAA\t0.1\n", ":3: k-mer 'AAAA' has length 4, expected k=3"),
    ("kmer\tnpmi\nAAN\t0.5\n", ":2: unknown k-mer 'AAN'"),
    ("kmer\tnpmi\nAAA\t0.5\nAAA\t0.1\n", ":3: k-mer 'AAA' listed twice"),
    ("# k: 3\nkmer\tnpmi\nAAA\tx\n", ":3: column 'npmi': 'x' is not a number"),
    ("", "empty NPMI table"),
    ("kmer\tnpmi\nAAA\t0.5\nAAT\tinf\n", ":3: column 'npmi': 'inf' is not a finite number"),
    ("kmer\tnpmi\nAAA\t-inf\n", ":2: column 'npmi': '-inf' is not a finite number"),
    ("kmer\tnpmi\nAAA\tNaN\n", ":2: column 'npmi': 'NaN' is not a finite number (leave"),
    ("kmer\tnpmi\nAAA\t1e30\n", ":2: column 'npmi': '1e30' is outside [-1000, 1000]"),
    ("kmer\tnpmi\nAAA\t-1001\n", ":2: column 'npmi': '-1001' is outside"),
    ("kmer\tnpmi\nAAA\t0_5\n", ":2: column 'npmi': '0_5' is not a number"),
    ("kmer\tnpmi\nAAA\t0x10\n", ":2: column 'npmi': '0x10' is not a number"),
])
def test_bad_tables_name_file_and_line(tmp_path, content, fragment):
    path = tmp_path / "bad.tsv"
    path.write_text(content)
    with pytest.raises(npmi_table.TableError) as e:
        npmi_table.load_table(path, 3)
    assert str(path) in str(e.value) and fragment in str(e.value)


def test_csv_with_a_byte_order_mark_loads(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeffngram,norm_dp_true_pmi\r\nAAA,0.25\r\nAAT,\r\nCCC,-1e-3\r\n"
                     .encode("utf-8"))
    table = npmi_table.load_table(path, 3)
    assert table[_code("AAA")] == np.float32(0.25) and table[_code("CCC")] == np.float32(-1e-3)
    assert np.isnan(table[_code("AAT")]) and np.isnan(table).sum() == 62


def test_written_tables_parse_strictly(tmp_path):
    """Every value repr() writes (tiny, huge within the bound, negative zero) reads back."""
    values = np.full(4 ** 3, np.nan)
    values[:6] = [5e-324, -0.0, 999.999, -1e-300, 1.0, 1 / 3]
    path = npmi_table.write_table(tmp_path / "t.tsv", values)
    loaded = npmi_table.load_table(path, 3)
    assert np.array_equal(loaded, values.astype(np.float32), equal_nan=True)


def test_genemask_csv_with_wrong_k_names_line(tmp_path, genemask_csv):
    with pytest.raises(npmi_table.TableError, match=rf"{genemask_csv.name}:2: .*expected k=4"):
        npmi_table.load_table(genemask_csv, 4)


def test_npmi_of_ids_numpy_and_torch():
    table = np.arange(64, dtype=np.float32)
    table[7] = np.nan
    ids = np.array([[2, 5, 6, 12, 68, 4, 69, 0]])
    got = npmi_table.npmi_of_ids(table, ids)
    want = np.array([[np.nan, 0, 1, np.nan, 63, np.nan, np.nan, np.nan]], dtype=np.float32)
    assert got.shape == ids.shape and np.array_equal(got, want, equal_nan=True)
    torch = pytest.importorskip("torch")
    t = npmi_table.npmi_of_ids(torch.from_numpy(table), torch.from_numpy(ids))
    assert isinstance(t, torch.Tensor) and np.array_equal(t.numpy(), want, equal_nan=True)
    assert NUM_SPECIAL == 5
