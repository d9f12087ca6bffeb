"""Using a model: `cmgems embed`, `predict` and `score-variants` run as subprocesses from an empty
folder on the export of the README's main job (a short run of it) and on a classifier finetuned
from it, with the bundled E. coli genome as plain and bgzip-compressed FASTA; and their refusals
of bad BED, VCF and FASTA lines (exit 2, the line named, no traceback, no output file)."""
from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import ECOLI, ROOT, read_genome, run_module

from cmgems.data.tokens import kmer_ids
from cmgems.errors import InputError
from cmgems.use.genome import Genome, read_bed, read_fasta, reverse_complement
from cmgems.use.windows import window_starts

CLI = ("-m", "launchers.cli")
CONTIG = "K-12-MG1655"


def cmgems(*args, cwd: Path, check=True):
    """`cmgems ARGS` as the checkout runs it, in `cwd`."""
    import os
    env = {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return run_module(*CLI, *map(str, args), cwd=cwd, env=env, check=check)


def write_fasta(path: Path, records: dict[str, str]) -> Path:
    path.write_text("".join(f">{name} some description\n" + "\n".join(
        seq[i:i + 60] for i in range(0, len(seq), 60)) + "\n" for name, seq in records.items()))
    return path


# ---------------------------------------------------------------------- the models and genomes
@pytest.fixture(scope="session")
def ecoli_seq() -> str:
    return read_genome(ECOLI)


@pytest.fixture(scope="session")
def genomes(tmp_path_factory, ecoli_seq) -> dict[str, Path]:
    """The bundled genome as plain FASTA and as bgzip-compressed FASTA (Bio.bgzf writes BGZF
    blocks as bgzip does), no index yet, and a plain-gzip copy."""
    d = tmp_path_factory.mktemp("genome")
    with gzip.open(ECOLI, "rb") as f:
        data = f.read()
    (d / "ecoli.fa").write_bytes(data)
    out = {"plain": d / "ecoli.fa", "gzip": d / "ecoli.fa.gz"}
    shutil.copy(ECOLI, out["gzip"])
    try:
        from Bio import bgzf
    except ImportError:
        return out
    with bgzf.BgzfWriter(str(d / "ecoli.bgz.fa.gz"), "wb") as w:
        w.write(data)
    out["bgzip"] = d / "ecoli.bgz.fa.gz"
    return out


@pytest.fixture(scope="session")
def main_export(tmp_path_factory) -> Path:
    """The export of the README's main job (launchers/pretrain.py with its default quick.yaml on
    the bundled genome), cut to 20 steps, run from an empty folder."""
    d = tmp_path_factory.mktemp("mainjob")
    run_module(str(ROOT / "launchers" / "pretrain.py"), "--max-steps", "20", "--eval-interval",
               "10", "--output-dir", "runs/main", "--no-log-model", "--no-system-metrics",
               cwd=d, env={"OMP_NUM_THREADS": "1"})
    export = d / "runs" / "main" / "export"
    assert (export / "model.safetensors").is_file()
    return export


@pytest.fixture(scope="session")
def finetuned(main_export, prom_core, tmp_path_factory) -> dict[str, Path]:
    """A classifier finetuned from the export on the prom-core-shaped task (phage lambda vs E.
    coli windows), saved with --save-model, and its own test predictions."""
    d = tmp_path_factory.mktemp("finetuned")
    run_module(str(ROOT / "launchers" / "finetune.py"), str(main_export),
               "--train", str(prom_core / "10" / "train.tsv"), "--test",
               str(prom_core / "test.tsv"), "--runs", "1", "--epochs", "2", "--max-length", "128",
               "--lr", "1e-3", "--save-model", str(d / "model"), "--out", str(d / "result.json"),
               "--no-tracking", cwd=d, env={"OMP_NUM_THREADS": "1"})
    return {"model": d / "model", "predictions": d / "result.predictions.tsv",
            "test": prom_core / "test.tsv"}


def read_h5(path: Path) -> tuple[np.ndarray, list[str], dict]:
    with h5py.File(path) as f:
        return (f["embeddings"][:], [n.decode() for n in f["names"][:]], dict(f.attrs))


def read_tsv(path: Path) -> list[dict]:
    header, *rows = [line.split("\t") for line in path.read_text().splitlines()]
    return [dict(zip(header, r)) for r in rows]


# ---------------------------------------------------------------------- units
@pytest.mark.parametrize("n, window, stride", [(5, 10, 10), (10, 10, 3), (100, 30, 30),
                                               (101, 30, 7), (31, 30, 30)])
def test_windows_cover_every_token_and_end_at_the_end(n, window, stride):
    starts = window_starts(n, window, stride)
    covered = np.zeros(n, dtype=bool)
    for s in starts:
        covered[s:s + window] = True
    assert covered.all() and starts[0] == 0
    assert min(starts[-1] + window, n) == n and (starts <= max(n - window, 0)).all()
    assert (np.diff(starts) <= stride).all() and len(set(starts.tolist())) == len(starts)


def test_bed_regions_from_the_genome(genomes, ecoli_seq, tmp_path):
    bed = tmp_path / "r.bed"
    bed.write_text(f"# a comment\ntrack name=x\n{CONTIG}\t100\t160\n"
                   f"{CONTIG}\t100\t160\tr2\t0\t-\n{CONTIG} 4639600 4639675 r3 0 +\n")
    with Genome(genomes["plain"]) as g:
        regions = read_bed(bed, g, min_length=6)
    assert [r.name for r in regions] == [f"{CONTIG}:100-160(.)", f"{CONTIG}:100-160(-)",
                                         f"{CONTIG}:4639600-4639675(+)"]
    assert regions[0].seq == ecoli_seq[100:160]
    assert regions[1].seq == reverse_complement(ecoli_seq[100:160])
    assert regions[2].seq == ecoli_seq[-75:]
    assert reverse_complement("ACGTNacgtR") == "YacgtNACGT"
    assert Path(str(genomes["plain"]) + ".fai").is_file()  # built on first use


def test_bgzip_genome_reads_as_the_plain_one(genomes, ecoli_seq):
    if "bgzip" not in genomes:
        pytest.skip(reason="biopython is not installed: no BGZF writer for the bgzip copy")
    with Genome(genomes["bgzip"]) as g:
        assert g.lengths == {CONTIG: len(ecoli_seq)}
        assert g.fetch(CONTIG, 2_000_000, 2_000_500) == ecoli_seq[2_000_000:2_000_500]
    assert Path(str(genomes["bgzip"]) + ".fai").is_file()
    assert Path(str(genomes["bgzip"]) + ".gzi").is_file()


@pytest.mark.parametrize("line, message", [
    (f"{CONTIG}\t10", r"line 2: 2 columns; BED needs chrom, start, end"),
    (f"{CONTIG}\tten\t20", r"line 2: start 'ten' and end '20' must be integers"),
    (f"{CONTIG}\t20\t20", r"line 2: region 20-20 is empty"),
    (f"{CONTIG}\t-5\t20", r"line 2: region -5-20 is empty or negative"),
    ("chr9\t10\t20", r"line 2: contig 'chr9' is not in ecoli.fa \(K-12-MG1655\)"),
    (f"{CONTIG}\t4639600\t4639700",
     r"line 2: region K-12-MG1655:4639600-4639700 runs off the contig, which has 4639675 bases"),
    (f"{CONTIG}\t10\t13", r"line 2: region K-12-MG1655:10-13 has 3 bases; at least 6"),
    (f"{CONTIG}\t10\t20\tx\t0\t*", r"line 2: strand '\*' in column 6 is not \+, - or \."),
])
def test_bad_bed_lines_are_refused_with_their_line(genomes, tmp_path, line, message):
    bed = tmp_path / "r.bed"
    bed.write_text(f"{CONTIG}\t0\t100\n{line}\n")
    with Genome(genomes["plain"]) as g, pytest.raises(InputError, match=message):
        read_bed(bed, g, min_length=6)


def test_n_only_regions_and_bad_fasta_lines_are_refused(tmp_path):
    genome = write_fasta(tmp_path / "g.fa", {"c1": "ACGT" * 30 + "N" * 100 + "ACGT" * 30})
    bed = tmp_path / "r.bed"
    bed.write_text("c1\t0\t50\nc1\t130\t200\n")
    with Genome(genome) as g, pytest.raises(InputError, match=r"line 2: region c1:130-200 holds "
                                                              r"only N"):
        read_bed(bed, g, 6)
    cases = {">a\nACGTACGT\nACGXAC\n": r"line 3, column 4: 'X' is not a nucleotide code",
             "ACGTACGT\n>a\nACGT\n": r"line 1: sequence before the first '>' header",
             ">a\nACGTACGT\n>\nACGTAA\n": r"line 3: header without an id",
             ">a\nACGTACGT\n>b\nACG\n": r"line 3: record 'b' has 3 bases; at least 6",
             ">a\nACGTACGT\n>b\nNNNNNNNN\n": r"line 3: record 'b' holds no A, C, G or T",
             "": r"no FASTA records"}
    for text, message in cases.items():
        (tmp_path / "s.fa").write_text(text)
        with pytest.raises(InputError, match=message):
            read_fasta(tmp_path / "s.fa", 6)
    (tmp_path / "s.fa").write_text(">a x\nacgtNNacgt\n\n>b\nTTTTTTTT\n")
    assert [(r.name, r.seq) for r in read_fasta(tmp_path / "s.fa", 6)] == \
        [("a", "ACGTNNACGT"), ("b", "TTTTTTTT")]


def test_plain_gzip_genome_is_refused_naming_bgzip(genomes):
    with pytest.raises(InputError, match=r"ecoli\.fa\.gz: plain gzip, which has no random "
                                         r"access; recompress it with bgzip"):
        Genome(genomes["gzip"])


# ---------------------------------------------------------------------- the commands
@pytest.mark.slow
def test_embed_regions_and_sequences(main_export, genomes, ecoli_seq, tmp_path):
    """From an empty folder: BED regions of the bgzip genome and FASTA records give one vector
    each; the same region twice the same vector; a '-' region the vector of its reverse
    complement; a region longer than the window the token-weighted mean of its windows."""
    genome = genomes.get("bgzip", genomes["plain"])
    window, k = 126, 6  # quick.yaml's 128-token blocks less [CLS] and [SEP]
    long_start, long_len = 50_000, 300  # 295 tokens: windows at 0, 126, 169
    bed = tmp_path / "r.bed"
    bed.write_text(f"{CONTIG}\t1000\t1100\n{CONTIG}\t1000\t1100\tsame\t0\t+\n"
                   f"{CONTIG}\t1000\t1100\trc\t0\t-\n"
                   f"{CONTIG}\t{long_start}\t{long_start + long_len}\n")
    run = tmp_path / "run"
    run.mkdir()
    res = cmgems("embed", main_export, "--genome", genome, "--bed", bed, "--out", "out/e.h5",
                 cwd=run)
    assert "4 embeddings of size 256" in res.stdout
    vectors, names, attrs = read_h5(run / "out" / "e.h5")
    assert vectors.shape == (4, 256) and vectors.dtype == np.float32
    assert names == [f"{CONTIG}:1000-1100(.)", f"{CONTIG}:1000-1100(+)",
                     f"{CONTIG}:1000-1100(-)", f"{CONTIG}:{long_start}-{long_start + 300}(.)"]
    weights = (main_export / "model.safetensors").read_bytes()
    assert attrs["model_sha256"] == hashlib.sha256(weights).hexdigest()
    assert attrs["model"] == str(main_export.resolve()) and attrs["window"] == window
    np.testing.assert_array_equal(vectors[0], vectors[1])
    assert not np.allclose(vectors[0], vectors[2])

    long_seq = ecoli_seq[long_start:long_start + long_len]
    starts = window_starts(long_len - k + 1, window, window)
    pieces = {f"w{s}": long_seq[s:s + window + k - 1] for s in starts}
    fasta = write_fasta(tmp_path / "s.fa", {"fwd": ecoli_seq[1000:1100],
                                            "rc": reverse_complement(ecoli_seq[1000:1100]),
                                            **pieces})
    cmgems("embed", main_export, "--fasta", fasta, "--out", "f.h5", "--batch-size", "2", cwd=run)
    fvec, fnames, _ = read_h5(run / "f.h5")
    assert fnames == ["fwd", "rc", *pieces]
    np.testing.assert_allclose(fvec[0], vectors[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fvec[1], vectors[2], rtol=1e-5, atol=1e-6)
    tokens = np.array([len(kmer_ids(p, k)) for p in pieces.values()], dtype=np.float64)
    pooled = (fvec[2:] * tokens[:, None]).sum(0) / tokens.sum()
    np.testing.assert_allclose(vectors[3], pooled, rtol=1e-4, atol=1e-5)

    cmgems("embed", main_export, "--fasta", fasta, "--out", "c.h5", "--pool", "cls", cwd=run)
    cvec, _, cattrs = read_h5(run / "c.h5")
    assert cattrs["pool"] == "cls" and not np.allclose(cvec[0], fvec[0])
    assert sorted(p.name for p in run.iterdir()) == ["c.h5", "f.h5", "out"]  # nothing else


@pytest.mark.slow
def test_predict_matches_the_finetuned_models_own_test_predictions(finetuned, tmp_path):
    """The classifier's labels for the test sequences (GeneMask k-mer text, spelled here as DNA)
    are those finetune itself predicted; the probabilities sum to 1."""
    rows = [line.split("\t") for line in finetuned["test"].read_text().splitlines()[1:]]
    seqs = {}
    for i, (text, _) in enumerate(rows):
        kmers = text.strip('"').split()
        seqs[f"s{i}"] = kmers[0] + "".join(t[-1] for t in kmers[1:])
    fasta = write_fasta(tmp_path / "test.fa", seqs)
    res = cmgems("predict", finetuned["model"], "--fasta", fasta, "--out", "p.tsv", cwd=tmp_path)
    assert f"predictions for {len(seqs)} sequences" in res.stdout
    out = read_tsv(tmp_path / "p.tsv")
    assert [r["name"] for r in out] == list(seqs)
    probs = np.array([[float(v) for k, v in r.items() if k.startswith("p_")] for r in out])
    assert probs.shape == (len(seqs), 2)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    labels = sorted({r["label"] for r in out})
    columns = [k[2:] for k in out[0] if k.startswith("p_")]
    assert set(labels) <= set(columns)
    ours = probs.argmax(1)
    theirs = np.array([int(r["run0"]) for r in read_tsv(finetuned["predictions"])])
    assert (ours == theirs).mean() >= 0.98, (ours, theirs)

    refused = cmgems("predict", finetuned["model"].parent.parent / "nope", "--fasta", fasta,
                     "--out", "q.tsv", cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "no config.json" in refused.stderr


@pytest.mark.slow
def test_predict_refuses_a_model_that_is_no_classifier(main_export, tmp_path):
    fasta = write_fasta(tmp_path / "s.fa", {"a": "ACGTACGTAGCTAGCTAGCATCGA"})
    res = cmgems("predict", main_export, "--fasta", fasta, "--out", "p.tsv", cwd=tmp_path,
                 check=False)
    assert res.returncode == 2 and "not a finetuned classifier" in res.stderr
    assert "--save-model" in res.stderr and not (tmp_path / "p.tsv").exists()


@pytest.mark.slow
def test_score_variants(main_export, genomes, ecoli_seq, tmp_path):
    """ALT = REF scores 0; the reverse change on a genome carrying ALT scores the opposite; a
    mismatching REF is reported on its row; indels and other non-SNVs are skipped and counted."""
    pos = [2001, 3_000_000, 60, 4639670]  # the last two: windows moved inside the contig
    ref = [ecoli_seq[p - 1] for p in pos]
    alt = [next(b for b in "ACGT" if b != r) for r in ref]
    wrong = next(b for b in "ACGT" if b != ecoli_seq[999])
    vcf = tmp_path / "v.vcf"
    lines = ["##fileformat=VCFv4.2", "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO"]
    lines += [f"{CONTIG}\t{p}\t.\t{r}\t{a}\t.\t.\t." for p, r, a in zip(pos, ref, alt)]
    lines += [f"{CONTIG}\t{pos[0]}\t.\t{ref[0]}\t{ref[0]}\t.\t.\t.",       # ALT = REF
              f"{CONTIG}\t1000\t.\t{wrong}\tA\t.\t.\t.",                       # REF mismatch
              f"{CONTIG}\t5000\t.\t{ecoli_seq[4999]}\t{ecoli_seq[4999]}T\t.\t.\t.",  # insertion
              f"{CONTIG}\t6000\t.\t{ecoli_seq[5999]}\t<DEL>,{alt[0]}\t.\t.\t."]  # one SNV of two
    vcf.write_text("\n".join(lines) + "\n")
    res = cmgems("score-variants", main_export, "--genome", genomes["plain"], "--vcf", vcf,
                 "--out", "s.tsv", cwd=tmp_path)
    assert "2 indel or other non-SNV alleles skipped" in res.stdout
    rows = read_tsv(tmp_path / "s.tsv")
    assert list(rows[0]) == ["chrom", "pos", "ref", "alt", "score", "window", "note"]
    assert len(rows) == 7
    scores = [float(r["score"]) for r in rows[:4]]
    assert all(np.isfinite(scores)) and any(s != 0 for s in scores)
    assert float(rows[4]["score"]) == 0.0
    assert rows[5]["score"] == "NA" and rows[5]["note"] == f"ref_mismatch: the genome has " \
                                                           f"{ecoli_seq[999]}"
    span = 126 + 5
    assert rows[0]["window"] == f"{CONTIG}:{2000 - span // 2}-{2000 - span // 2 + span}"
    assert rows[2]["window"] == f"{CONTIG}:0-{span}"
    assert rows[3]["window"] == f"{CONTIG}:{len(ecoli_seq) - span}-{len(ecoli_seq)}"

    # the genome carrying every ALT (far apart: no window holds two), scored back to REF
    carried = list(ecoli_seq)
    for p, a in zip(pos, alt):
        carried[p - 1] = a
    alt_genome = write_fasta(tmp_path / "alt.fa", {CONTIG: "".join(carried)})
    back = tmp_path / "back.vcf"
    back.write_text("\n".join(f"{CONTIG}\t{p}\t.\t{a}\t{r}" for p, r, a in zip(pos, ref, alt))
                    + "\n")
    cmgems("score-variants", main_export, "--genome", alt_genome, "--vcf", back, "--out",
           "b.tsv", cwd=tmp_path)
    reverse = [float(r["score"]) for r in read_tsv(tmp_path / "b.tsv")]
    np.testing.assert_allclose(reverse, [-s for s in scores], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("command, files, message", [
    ("embed", {"r.bed": f"{CONTIG}\t0\t100\n{CONTIG}\t4639600\t4639700\n"},
     r"r\.bed, line 2: region K-12-MG1655:4639600-4639700 runs off the contig"),
    ("embed", {"r.bed": f"{CONTIG}\t0\t100\n\nchrX\t5\t50\n"},
     r"r\.bed, line 3: contig 'chrX' is not in"),
    ("embed-fasta", {"s.fa": ">a\nACGTACGTAC\n>b\nACGT ACGT\n"},
     r"s\.fa, line 4, column 5: ' ' is not a nucleotide code"),
    ("score-variants", {"v.vcf": f"#CHROM\tPOS\tID\tREF\tALT\n{CONTIG}\t0\t.\tA\tC\n"},
     r"v\.vcf, line 2: POS 0 must be >= 1"),
    ("score-variants", {"v.vcf": f"{CONTIG}\t10\t.\tA\n"},
     r"v\.vcf, line 1: 4 tab-separated columns"),
    ("score-variants", {"v.vcf": f"{CONTIG}\t10\t.\tA\tC\nplasmid\t10\t.\tA\tC\n"},
     r"v\.vcf, line 2: contig 'plasmid' is not in"),
    ("gzip-genome", {"r.bed": f"{CONTIG}\t0\t100\n"}, r"plain gzip.*bgzip"),
])
def test_bad_inputs_exit_2_naming_the_line(main_export, genomes, tmp_path, command, files,
                                           message):
    import re
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    out = tmp_path / "out.file"
    if command == "embed":
        args = ["embed", main_export, "--genome", genomes["plain"], "--bed", "r.bed"]
    elif command == "embed-fasta":
        args = ["embed", main_export, "--fasta", "s.fa"]
    elif command == "gzip-genome":
        args = ["embed", main_export, "--genome", genomes["gzip"], "--bed", "r.bed"]
    else:
        args = ["score-variants", main_export, "--genome", genomes["plain"], "--vcf", "v.vcf"]
    res = cmgems(*args, "--out", out, cwd=tmp_path, check=False)
    assert res.returncode == 2, res.stderr[-2000:]
    assert re.search(message, res.stderr), res.stderr
    assert "Traceback" not in res.stderr and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
