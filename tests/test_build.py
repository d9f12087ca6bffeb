"""End-to-end dataset builds: shards, manifest, split, idempotence, refusals, interruption."""
from __future__ import annotations

import gzip
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from cmgems.data import npmi_table
from cmgems.data.shards import Manifest, ShardError, ShardSet, verify
from cmgems.data.tokens import vocab
from conftest import ECOLI, LAMBDA, ROOT, run_module
from preprocessing import samples
from preprocessing.build import BuildConfig, build

def _synthetic(path: Path, lengths: list[int], seed: int = 0, n_every: int = 0,
               width: int = 70) -> dict[str, str]:
    """Random records; with n_every, runs of N and single IUPAC symbols every ~n_every bases."""
    rng = np.random.default_rng(seed)
    records = {}
    for i, length in enumerate(lengths):
        seq = rng.choice(np.frombuffer(b"ACGTacgt", np.uint8), length,
                         p=[.22, .22, .22, .22, .03, .03, .03, .03])
        if n_every:
            for at in rng.integers(0, length, length // n_every):
                seq[at:at + int(rng.integers(1, 30))] = ord("N") if rng.random() < .7 else ord("R")
        records[f"rec{i}"] = seq.tobytes().decode()
    with open(path, "w") as f:
        for name, s in records.items():
            f.write(f">{name} synthetic\n")
            f.write("\n".join(s[j:j + width] for j in range(0, len(s), width)) + "\n")
    return records


def _decode(ids: np.ndarray, k: int) -> str:
    """Nucleotides covered by consecutive tokens (checking each overlaps the previous one)."""
    words = vocab(k)
    kms = [words[i] for i in ids]
    for a, b in zip(kms, kms[1:]):
        assert a[1:] == b[:-1], "consecutive tokens do not overlap: sample is not contiguous"
    return kms[0] + "".join(w[-1] for w in kms[1:])


def _all_samples(out: Path):
    m = Manifest.load(out)
    for split in ("train", "valid"):
        if m.split_shards(split):
            ss = ShardSet(out, split)
            for i in range(len(ss)):
                yield split, ss[i]


def test_tiny_dataset_layout(tiny_dataset, lambda_fasta):
    m = Manifest.load(tiny_dataset)
    verify(tiny_dataset, m)
    assert m.k == 6 and m.vocab_size == 4101
    assert m.source["name"] == "lambda_phage.fa.gz" and len(m.source["sha256"]) == 64
    assert m.params["min_count"] == 5 and m.params["valid_fraction"] == 0.1
    assert m.params["shard_tokens"] == 20000 and m.params["seed"] == 0
    train, valid = m.split_shards("train"), m.split_shards("valid")
    assert len(train) >= 2 and len(valid) >= 1
    assert all(s["tokens"] <= 20000 + samples.MAX_TOKENS for s in m.shards)
    total = sum(s["tokens"] for s in m.shards)
    assert total + m.stats["tokens_dropped"] == 48502 - 5     # every 6-mer of lambda, once
    n_valid = sum(s["samples"] for s in valid) / sum(s["samples"] for s in m.shards)
    assert 0.02 < n_valid < 0.25
    table = npmi_table.load_table(tiny_dataset / "npmi.tsv", 6)
    with h5py.File(tiny_dataset / train[0]["path"]) as f:
        assert f["tokens"].dtype == np.uint16 and f["npmi"].dtype == np.float32
        assert f.attrs["format_version"] == 2
        assert f["offsets"].dtype == np.int64
        assert f.attrs["k"] == 6 and f.attrs["vocab_size"] == 4101
        assert f.attrs["npmi_table_sha256"] == m.npmi_table_sha256
        assert f.attrs["source_sha256"] == m.source["sha256"] and f.attrs["seed"] == 0
        assert f.attrs["split"] == "train"
    genome = "".join(l.strip() for l in gzip.open(lambda_fasta, "rt") if not l.startswith(">"))
    for split, (ids, npmi) in _all_samples(tiny_dataset):
        assert ids.min() >= 5 and samples.MIN_TOKENS <= len(ids) <= samples.MAX_TOKENS
        assert _decode(ids, 6) in genome
        want = npmi_table.npmi_of_ids(table, ids)
        assert np.array_equal(npmi, want, equal_nan=True)


def test_samples_never_span_a_break_and_cover_every_kmer(tmp_path):
    genome = tmp_path / "g.fa"
    records = _synthetic(genome, [40_000, 7, 0, 25_000, 9_000], seed=3, n_every=900)
    out = tmp_path / "out"
    # small pieces: runs are also cut at piece boundaries, which must lose no k-mer either
    m = build(BuildConfig(genome=genome, out_dir=out, k=5, min_count=3, valid_fraction=0.2,
                          shard_tokens=8000, piece_bases=3000), out=io.StringIO())
    runs = [r for s in records.values() for r in
            "".join(c if c in "ACGT" else " " for c in s.upper()).split()]
    seen = 0
    for split, (ids, _) in _all_samples(out):
        text = _decode(ids, 5)
        assert any(text in r for r in runs), "sample spans a non-ACGT symbol or record boundary"
        seen += len(ids)
    all_kmers = sum(max(0, len(r) - 4) for r in runs if len(r) >= 5 + 4)
    assert seen + m.stats["tokens_dropped"] == all_kmers
    assert m.stats["records"] == 5 and m.stats["empty_records"] == 1
    assert m.stats["short_records"] == 1
    assert m.stats["bases_non_acgt"] == sum(
        sum(c not in "ACGTacgt" for c in s) for s in records.values() if len(s) >= 9)


def test_sample_length_distribution(tmp_path):
    genome = tmp_path / "g.fa"
    _synthetic(genome, [1_500_000], seed=1, width=500)
    out = tmp_path / "out"
    build(BuildConfig(genome=genome, out_dir=out, valid_fraction=0.0, min_count=2),
          out=io.StringIO())
    lengths = ShardSet(out, "train").lengths
    full = lengths == samples.MAX_TOKENS
    assert len(lengths) > 3000
    # half at 510 (plus the uniform draws that hit 510), the rest uniform on 5..510
    assert 0.47 < full.mean() < 0.54
    rest = lengths[~full]
    assert rest.min() >= samples.MIN_TOKENS
    assert abs(rest.mean() - 257) < 12
    hist = np.histogram(rest, bins=5, range=(5, 510))[0] / len(rest)
    assert np.all(np.abs(hist - 0.2) < 0.04)


@pytest.mark.parametrize("table", ["counted", "external"])
def test_workers_do_not_change_the_output(tmp_path, table):
    """1, 2 or 3 workers, the genome cached between the passes or read twice: the same bytes.
    Small pieces and shards, so every shard is written by several workers and most pieces
    write into two shards."""
    genome = tmp_path / "g.fa"
    _synthetic(genome, [300_000, 120_000, 9, 50_000], seed=5, n_every=5000)
    extra = {}
    if table == "external":
        extra["npmi_table"] = tmp_path / "t.tsv"
        npmi_table.write_table(extra["npmi_table"], np.random.default_rng(0).normal(size=4096))
    outs = []
    for w, cache in ((1, 256 << 20), (2, 256 << 20), (3, 256 << 20), (2, 0), (1, 0)):
        out = tmp_path / f"w{w}-{cache}"
        build(BuildConfig(genome=genome, out_dir=out, min_count=3, workers=w, shard_tokens=50_000,
                          piece_bases=40_000, cache_bytes=cache, valid_fraction=0.1, **extra),
              out=io.StringIO())
        outs.append(out)
    a = Manifest.load(outs[0])
    assert len(a.split_shards("train")) > 5 and a.split_shards("valid")
    for out in outs[1:]:
        b = Manifest.load(out)
        assert [s["sha256"] for s in a.shards] == [s["sha256"] for s in b.shards]
        assert (outs[0] / "npmi.tsv").read_bytes() == (out / "npmi.tsv").read_bytes()
        assert {**a.stats, "seconds": 0} == {**b.stats, "seconds": 0}


def test_rebuild_is_up_to_date_and_other_params_are_refused(tmp_path, lambda_fasta):
    out = tmp_path / "out"
    args = ["-m", "preprocessing", "build", str(lambda_fasta), str(out), "--min-count", "5",
            "--shard-tokens", "10000"]
    run_module(*args)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = run_module(*args)
    assert "up to date" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes

    refused = run_module(*args[:-1], "20000", check=False)
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: ") and str(out) in refused.stderr
    assert "shard_tokens" in refused.stderr and "--overwrite" in refused.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes

    run_module(*args[:-1], "20000", "--overwrite")
    m = Manifest.load(out)
    assert m.params["shard_tokens"] == 20000
    assert sorted(p.name for p in out.glob("*.h5")) == sorted(s["path"] for s in m.shards)
    verify(out, m)
    assert not list(tmp_path.glob(".out.partial-*"))


def test_valid_records_and_external_table(tmp_path, genemask_csv):
    genome = tmp_path / "g.fa.gz"
    plain = tmp_path / "plain.fa"
    _synthetic(plain, [30_000, 10_000, 8_000], seed=9)
    genome.write_bytes(gzip.compress(plain.read_bytes()))
    out = tmp_path / "out"
    m = build(BuildConfig(genome=genome, out_dir=out, valid_records=("rec1", "rec2"),
                          npmi_table=genemask_csv), out=io.StringIO())
    assert m.params["valid_fraction"] == 0.0 and m.params["npmi_table"]["name"] == genemask_csv.name
    valid_tokens = sum(s["tokens"] for s in m.split_shards("valid"))
    # every 6-mer of rec1 and rec2 but a last fragment under MIN_TOKENS at each record's end
    assert (10_000 - 5) + (8_000 - 5) - 2 * 4 <= valid_tokens <= (10_000 - 5) + (8_000 - 5)
    assert m.stats["samples"]["train"] > 0
    table = npmi_table.load_table(genemask_csv, 6)
    ids, npmi = ShardSet(out, "train")[0]
    assert np.array_equal(npmi, table[ids - 5])
    assert np.array_equal(npmi_table.load_table(out / "npmi.tsv", 6), table)

    with pytest.raises(Exception, match="--valid-records: nope not found"):
        build(BuildConfig(genome=genome, out_dir=tmp_path / "o2", valid_records=("nope",),
                          npmi_table=genemask_csv), out=io.StringIO())
    assert not (tmp_path / "o2").exists() and not list(tmp_path.glob(".o2.partial-*"))


@pytest.mark.parametrize("content, fragment", [
    (b"this is not a genome\n", ":1: not FASTA"),
    (b"", "empty file"),
    ("truncated", "truncated gzip"),
])
def test_bad_genome_exits_2_and_leaves_nothing(tmp_path, content, fragment):
    genome = tmp_path / "bad.fa"
    if content == "truncated":
        seq = np.random.default_rng(0).choice(np.frombuffer(b"ACGT", np.uint8), 200_000).tobytes()
        genome = tmp_path / "bad.fa.gz"
        genome.write_bytes(gzip.compress(b">a\n" + seq + b"\n")[:-500])
    else:
        genome.write_bytes(content)
    out = tmp_path / "out"
    res = run_module("-m", "preprocessing", "build", str(genome), str(out), check=False)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith(f"error: {genome}")
    assert fragment in res.stderr and "Traceback" not in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [genome.name]


def test_scored_fraction_is_recorded_and_a_low_one_is_said(tmp_path, lambda_fasta, tiny_dataset):
    """Lambda at the default --min-count 101 scores no k-mer: the build warns (it still builds:
    random masking works) and the manifest records the fraction for the trainer to refuse."""
    out = tmp_path / "lambda"
    res = run_module("-m", "preprocessing", "build", str(lambda_fasta), str(out))
    warning = [ln for ln in res.stderr.replace("\r", "\n").splitlines() if "warning:" in ln]
    assert len(warning) == 1, res.stderr
    assert warning[0].startswith(f"warning: {out / 'npmi.tsv'}: NO k-mer is scored (0 of 4096 "
                                 f"6-mers): lambda_phage.fa.gz is too small for --min-count 101")
    m = Manifest.load(out)
    assert m.stats["npmi_scored"] == 0 and m.stats["npmi_scored_fraction"] == 0.0
    tiny = Manifest.load(tiny_dataset)         # --min-count 5: scored enough, no warning
    assert tiny.stats["npmi_scored_fraction"] == tiny.stats["npmi_scored"] / 4096 > 0.8

    table = tmp_path / "nan.csv"               # an external table without one score
    table.write_text("ngram,norm_dp_true_pmi\n" + "".join(f"{w},\n" for w in npmi_table.kmers(6)))
    res = run_module("-m", "preprocessing", "build", str(lambda_fasta), str(tmp_path / "ext"),
                     "--npmi-table", str(table))
    assert f"warning: {table}: NO k-mer is scored (0 of 4096 6-mers): the table nan.csv" in \
        res.stderr
    assert Manifest.load(tmp_path / "ext").stats["npmi_scored_fraction"] == 0.0
    res = run_module("-m", "preprocessing", "build", str(lambda_fasta), str(tmp_path / "ok"),
                     "--min-count", "5")
    assert "warning" not in res.stderr


def test_bad_options_exit_2(tmp_path, lambda_fasta):
    res = run_module("-m", "preprocessing", "build", str(lambda_fasta), str(tmp_path / "o"),
                     "--valid-fraction", "1.5", check=False)
    assert res.returncode == 2 and "--valid-fraction" in res.stderr
    res = run_module("-m", "preprocessing", "build", str(tmp_path / "missing.fa"),
                     str(tmp_path / "o"), check=False)
    assert res.returncode == 2 and "missing.fa" in res.stderr and "cannot read" in res.stderr
    assert not (tmp_path / "o").exists()


def test_help_shows_every_option_with_defaults():
    text = run_module("-m", "preprocessing", "build", "--help").stdout
    for opt in ("--k", "--min-count", "--valid-fraction", "--valid-records", "--seed", "--workers",
                "--npmi-table", "--shard-tokens", "--overwrite"):
        assert opt in text
    assert "default: 101" in text and "default: 4000000" in text
    assert "--min-count" in run_module("-m", "preprocessing", "npmi", "--help").stdout


def test_npmi_command_writes_the_build_table(tmp_path, tiny_dataset, lambda_fasta):
    out = tmp_path / "t.tsv"
    run_module("-m", "preprocessing", "npmi", str(lambda_fasta), str(out), "--min-count", "5")
    assert out.read_text() == (tiny_dataset / "npmi.tsv").read_text()


def test_ecoli_default_build(tmp_path):
    out = tmp_path / "ecoli"
    res = run_module("-m", "preprocessing", "build", str(ECOLI), str(out), "--workers", "2")
    assert "Mbp/s" in res.stdout
    m = Manifest.load(out)
    assert 2 <= len(m.split_shards("train")) <= 4 and len(m.split_shards("valid")) == 1
    assert m.stats["bases"] == 4_639_675 and m.stats["bases_non_acgt"] == 0
    assert 0.5 * 4096 < m.stats["npmi_scored"] <= 4096
    ss = ShardSet(out, "valid")
    assert 0.01 < len(ss) / (len(ss) + len(ShardSet(out, "train"))) < 0.03


def _wait_for(pred, proc, what):
    while not pred():
        if proc.poll() is not None:
            pytest.fail(f"build exited ({proc.returncode}) before {what}:\n{proc.stderr.read()}")
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.parametrize("sig, workers", [(signal.SIGKILL, 1), (signal.SIGINT, 2)])
def test_interrupted_build_leaves_nothing_loadable(tmp_path, sig, workers):
    genome = tmp_path / "big.fa"
    _synthetic(genome, [12_000_000] * 4, seed=2, width=1000)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "preprocessing", "build", str(genome), str(out),
                             "--min-count", "2", "--shard-tokens", "200000",
                             "--workers", str(workers)], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # kill once shards are being written into the hidden working directory
        _wait_for(lambda: any(p.glob("train-*.h5") for p in tmp_path.glob(".out.partial-*")),
                  proc, "writing shards")
        # Ctrl-C in a terminal signals the whole process group: the workers too
        os.killpg(proc.pid, sig)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    with pytest.raises(ShardError):
        Manifest.load(out)
    with pytest.raises(ShardError):
        ShardSet(out, "train")
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and not list(tmp_path.glob(".out.partial-*"))
        assert "Traceback" not in err, err
        assert err.replace("\r", "\n").strip().splitlines()[-1] == \
            f"interrupted: nothing written ({out} unchanged)"
    # the next build cleans up whatever the killed one left and succeeds
    run_module("-m", "preprocessing", "build", str(genome), str(out), "--min-count", "2",
               "--shard-tokens", "2000000")
    verify(out)
    assert not list(tmp_path.glob(".out.partial-*"))


# ---- one writer per OUT_DIR, and a publish that is never left half-way ----

def test_a_second_build_into_the_same_out_dir_is_refused(tmp_path, lambda_fasta):
    """The lock is a real flock held by another process (this test); its pid and host are in
    the refusal. Once released, the build runs, and leaves no lock file behind."""
    import socket
    from cmgems.io import exclusive_lock
    out = tmp_path / "data"
    args = ["-m", "preprocessing", "build", str(lambda_fasta), str(out), "--min-count", "5"]
    with exclusive_lock(tmp_path / ".data.lock", "test"):
        res = run_module(*args, check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip() == (
        f"error: {tmp_path / '.data.lock'}: the dataset directory {out} is in use by pid "
        f"{os.getpid()} on host {socket.gethostname()} "
        + res.stderr.split(socket.gethostname() + " ", 1)[1].strip())
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []
    run_module(*args)
    assert not (tmp_path / ".data.lock").exists()
    verify(out)


def test_a_dead_builds_lock_is_taken_over(tmp_path, lambda_fasta):
    lock = tmp_path / ".data.lock"
    lock.write_text('{"pid": 4000000, "host": "gone", "since": "yesterday"}')  # nobody flocks it
    res = run_module("-m", "preprocessing", "build", str(lambda_fasta), str(tmp_path / "data"),
                     "--min-count", "5")
    assert f"warning: {lock}: taking over the lock of pid 4000000 on host gone" in res.stderr
    assert not lock.exists()
    verify(tmp_path / "data")


def _dataset(tmp_path: Path, name: str, shard_tokens: int) -> tuple[Path, BuildConfig]:
    genome = tmp_path / "g.fa"
    if not genome.exists():
        _synthetic(genome, [60_000, 30_000], seed=4)
    cfg = BuildConfig(genome=genome, out_dir=tmp_path / name, min_count=2,
                      shard_tokens=shard_tokens, overwrite=True)
    return genome, cfg


def test_sigint_while_publishing_an_overwrite_waits_for_the_renames(tmp_path, monkeypatch, capsys):
    """A real SIGINT raised inside the publish (from the removal of the old dataset, after the
    renames began): the publish completes, OUT_DIR holds the whole new dataset, and the message
    says so instead of "nothing written"."""
    import shutil
    import preprocessing.__main__ as cli
    from preprocessing import output_dir
    _, cfg = _dataset(tmp_path, "data", 20_000)
    build(cfg, out=io.StringIO())
    old = Manifest.load(cfg.out_dir)
    rmtree = shutil.rmtree

    def interrupted_rmtree(path, *a, **kw):
        if output_dir.OLD_TAG in str(path):
            os.kill(os.getpid(), signal.SIGINT)     # handled: remembered, raised after publish
        return rmtree(path, *a, **kw)

    monkeypatch.setattr(output_dir.shutil, "rmtree", interrupted_rmtree)
    code = cli.main(["build", str(cfg.genome), str(cfg.out_dir), "--min-count", "2",
                     "--shard-tokens", "50000", "--overwrite"])
    err = capsys.readouterr().err
    assert code == 130
    assert err.strip().splitlines()[-1] == (f"interrupted: {cfg.out_dir.resolve()} was already "
                                            f"published, complete")
    new = Manifest.load(cfg.out_dir)
    verify(cfg.out_dir, new)
    assert new.params["shard_tokens"] == 50_000 and new.shards != old.shards
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "g.fa"]


def test_sigint_before_the_publish_keeps_the_old_dataset(tmp_path, monkeypatch, capsys):
    import preprocessing.__main__ as cli
    from preprocessing import output_dir
    _, cfg = _dataset(tmp_path, "data", 20_000)
    build(cfg, out=io.StringIO())
    old = Manifest.load(cfg.out_dir)
    save = Manifest.save

    def interrupted_save(self, directory):      # the manifest saved, the publish not begun
        path = save(self, directory)
        os.kill(os.getpid(), signal.SIGINT)
        return path

    monkeypatch.setattr(output_dir.Manifest, "save", interrupted_save)
    code = cli.main(["build", str(cfg.genome), str(cfg.out_dir), "--min-count", "2",
                     "--shard-tokens", "50000", "--overwrite"])
    assert code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"interrupted: nothing written ({cfg.out_dir} unchanged)"
    assert Manifest.load(cfg.out_dir) == old
    verify(cfg.out_dir, old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "g.fa"]


def test_a_dataset_set_aside_by_a_killed_publish_is_put_back(tmp_path):
    """kill -9 between the publish's two renames leaves OUT_DIR missing and the old dataset
    under its aside name: the next build puts it back (here: up to date, nothing rebuilt)."""
    from preprocessing.output_dir import OLD_TAG
    _, cfg = _dataset(tmp_path, "data", 20_000)
    build(cfg, out=io.StringIO())
    aside = tmp_path / f".data{OLD_TAG}4000000"
    cfg.out_dir.rename(aside)
    (tmp_path / ".data.partial-4000000").mkdir()       # the new one, unfinished
    log = io.StringIO()
    import logging
    handler = logging.StreamHandler(log)
    logging.getLogger("cmgems").addHandler(handler)
    try:
        build(cfg, out=(printed := io.StringIO()))
    finally:
        logging.getLogger("cmgems").removeHandler(handler)
    assert "putting back the dataset that an interrupted --overwrite set aside" in log.getvalue()
    assert "up to date" in printed.getvalue()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "g.fa"]


def test_overwrite_refuses_to_delete_files_that_are_not_the_datasets(tmp_path):
    _, cfg = _dataset(tmp_path, "data", 20_000)
    build(cfg, out=io.StringIO())
    (cfg.out_dir / "my-notes.txt").write_text("keep me\n")
    cfg.shard_tokens = 50_000
    with pytest.raises(Exception, match=r"refusing to replace: it holds my-notes.txt, which are "
                                        r"not part of a dataset"):
        build(cfg, out=io.StringIO())
    assert (cfg.out_dir / "my-notes.txt").read_text() == "keep me\n"
    verify(cfg.out_dir)


@pytest.mark.parametrize("edit, fragment", [
    (lambda m: [m], "a manifest is a JSON object, got list"),
    (lambda m: "dataset", "a manifest is a JSON object, got str"),
    (lambda m: {**m, "shards": [{k: v for k, v in s.items() if k != "sha256"}
                                for s in m["shards"]]}, "shards[0] lacks 'sha256'"),
    (lambda m: {**m, "shards": [{**s, "path": "../../etc/passwd"} for s in m["shards"]]},
     "shards[0].path '../../etc/passwd' is not a file name in the dataset directory"),
    (lambda m: {**m, "shards": [{**s, "sha256": "abc"} for s in m["shards"]]},
     "shards[0].sha256 'abc' is not a sha256 hex digest"),
    (lambda m: {**m, "shards": [{**s, "tokens": "many"} for s in m["shards"]]},
     "shards[0].tokens must be int, got 'many'"),
    (lambda m: {**m, "shards": {"train": 1}}, "field 'shards' must be list, got dict"),
    (lambda m: {**m, "k": True}, "field 'k' must be int, got bool"),
])
def test_a_malformed_manifest_is_a_shard_error(tmp_path, tiny_dataset, edit, fragment):
    import json
    import shutil
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    path = data / "manifest.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(ShardError) as e:
        Manifest.load(data)
    assert str(e.value).startswith(f"{path}: not a valid cmgems manifest (") and \
        fragment in str(e.value), str(e.value)
    path.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(ShardError, match="not a valid cmgems manifest"):
        Manifest.load(data)


# ---- NPMI as stored: the definition recorded, the table's ranking kept ----

def test_npmi_definition_is_an_option_recorded_in_table_and_manifest(tmp_path, lambda_fasta):
    for definition in ("genemask", "levine"):
        out = tmp_path / definition
        run_module("-m", "preprocessing", "build", str(lambda_fasta), str(out), "--min-count",
                   "5", "--npmi-definition", definition)
        assert Manifest.load(out).params["npmi_definition"] == definition
        assert f"# definition: {definition}" in (out / "npmi.tsv").read_text().splitlines()
        table = tmp_path / f"{definition}.tsv"
        run_module("-m", "preprocessing", "npmi", str(lambda_fasta), str(table), "--min-count",
                   "5", "--npmi-definition", definition)
        assert table.read_text() == (out / "npmi.tsv").read_text()
    assert Manifest.load(tmp_path / "genemask").params == {
        **Manifest.load(tmp_path / "levine").params, "npmi_definition": "genemask"}
    res = run_module("-m", "preprocessing", "build", str(lambda_fasta), str(tmp_path / "x"),
                     "--npmi-definition", "pmi", check=False)
    assert res.returncode == 2 and "--npmi-definition: invalid choice: 'pmi'" in res.stderr
    assert "--npmi-definition" in run_module("-m", "preprocessing", "build", "--help").stdout
    help_text = " ".join(run_module("-m", "preprocessing", "npmi", "--help").stdout.split())
    assert "--npmi-definition {genemask,levine}" in help_text and "(default: 'genemask')" in help_text


def test_default_definition_is_genemask_and_an_external_table_records_none(tmp_path, tiny_dataset):
    assert BuildConfig(genome="g.fa", out_dir="o").npmi_definition == "genemask"
    assert Manifest.load(tiny_dataset).params["npmi_definition"] == "genemask"
    table = tmp_path / "t.tsv"
    npmi_table.write_table(table, np.linspace(-1, 1, 4096))
    cfg = BuildConfig(genome=LAMBDA, out_dir=tmp_path / "ext", npmi_table=table)
    m = build(cfg, out=io.StringIO())
    assert m.params["npmi_definition"] is None


def test_shards_keep_every_distinct_npmi_value_of_the_table(tmp_path):
    """4,096 distinct table values, closer together than float16 can tell apart: every token's
    stored NPMI is its table value in float32, so ranking by the stored values is ranking by the
    table (float16 gave 4,096 k-mers about 2,257 distinct values)."""
    genome = tmp_path / "g.fa"
    _synthetic(genome, [400_000], seed=8)
    rng = np.random.default_rng(0)
    values = np.linspace(0.5, 0.6, 4096)[rng.permutation(4096)]   # 2.4e-5 apart
    assert len(np.unique(values.astype(np.float16))) < 1000
    table = tmp_path / "dense.tsv"
    npmi_table.write_table(table, values)
    out = tmp_path / "out"
    build(BuildConfig(genome=genome, out_dir=out, npmi_table=table, valid_fraction=0.0),
          out=io.StringIO())
    ids = np.concatenate([s[0] for _, s in _all_samples(out)])
    stored = np.concatenate([s[1] for _, s in _all_samples(out)])
    assert stored.dtype == np.float32
    assert np.array_equal(stored, values[ids - 5].astype(np.float32))
    seen = np.unique(ids)
    assert len(seen) > 4000
    assert len(np.unique(stored)) == len(seen)         # no two k-mers tied
    order = np.argsort(values[seen - 5])
    first = {int(t): float(v) for t, v in zip(ids, stored)}
    assert np.all(np.diff([first[int(t)] for t in seen[order]]) > 0)


@pytest.mark.parametrize("where", ["manifest", "shard"])
def test_a_version_1_dataset_is_refused_with_rebuild(tmp_path, tiny_dataset, where):
    import json
    import shutil
    data = tmp_path / "old"
    shutil.copytree(tiny_dataset, data)
    if where == "manifest":
        m = json.loads((data / "manifest.json").read_text())
        m["format_version"] = 1
        (data / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(ShardError, match=r"format version 1, this cmgems reads version 2; "
                                             r"rebuild it: python -m preprocessing build"):
            Manifest.load(data)
    else:
        with h5py.File(data / "train-00000.h5", "r+") as f:
            f.attrs["format_version"] = 1
        with pytest.raises(ShardError, match=r"train-00000.h5: shard format version 1, this "
                                             r"cmgems reads version 2; rebuild it"):
            ShardSet(data, "train")


def test_a_stream_as_the_genome_is_refused_up_front(tmp_path):
    """`build /dev/stdin` with the genome piped in: refused at once, not a hang or an empty
    genome (the genome is read more than once)."""
    proc = subprocess.run([sys.executable, "-m", "preprocessing", "build", "/dev/stdin",
                           str(tmp_path / "out")], cwd=ROOT, input=">a\nACGT\n",
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        "error: /dev/stdin: cannot read genome (a named pipe: the genome is read more than once, "
        "so it must be a file on disk; save the stream to a file first)")
    assert not (tmp_path / "out").exists()


def test_an_old_format_dataset_in_out_dir_is_named_as_such(tmp_path, tiny_dataset, lambda_fasta):
    import json
    import shutil
    out = tmp_path / "data"
    shutil.copytree(tiny_dataset, out)
    m = json.loads((out / "manifest.json").read_text())
    m["format_version"] = 1
    (out / "manifest.json").write_text(json.dumps(m))
    res = run_module("-m", "preprocessing", "build", str(lambda_fasta), str(out), "--min-count",
                     "5", "--valid-fraction", "0.1", "--shard-tokens", "20000", check=False)
    assert res.returncode == 2
    assert res.stderr.strip() == (
        f"error: {out}: refusing to write: it holds a dataset of format version 1 (this cmgems "
        f"reads and writes version 2); pass --overwrite to replace it")
    run_module("-m", "preprocessing", "build", str(lambda_fasta), str(out), "--min-count", "5",
               "--valid-fraction", "0.1", "--shard-tokens", "20000", "--overwrite")
    verify(out)
