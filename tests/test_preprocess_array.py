"""The job-array stages of build (count -> table -> shard -> finish), run by hand as subprocesses
and as Slurm jobs via launchers/slurm/preprocess.sbatch --groups N: the dataset must be the one a
single `build` gives (same shard bytes, same npmi.tsv, same manifest but for the time)."""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from cmgems.data.shards import Manifest, ShardSet, verify
from conftest import LAMBDA, ROOT, run_module
from test_build import _synthetic

# records: one of several pieces (> 512 kbp), small ones, an empty one, one shorter than a sample
LENGTHS = [1_100_000, 30_000, 400_000, 0, 7, 250_000, 90_000, 600_000]


def _genome(tmp_path: Path) -> Path:
    genome = tmp_path / "g.fa"
    _synthetic(genome, [max(n, 1) for n in LENGTHS], seed=3, n_every=20_000)
    genome.write_text(re.sub(r"(>rec3 synthetic\n).\n", r"\1", genome.read_text()))
    return genome


def _stages(genome: Path, work: Path, out: Path, groups: int, options: list[str],
            workers=lambda i: 1, finish: tuple[str, ...] = ()) -> None:
    for i in range(groups):
        run_module("-m", "preprocessing", "count", str(genome), str(work), "--group",
                   f"{i}/{groups}", "--workers", str(workers(i)), *options)
    run_module("-m", "preprocessing", "table", str(work))
    for i in range(groups):
        run_module("-m", "preprocessing", "shard", str(genome), str(work), "--group",
                   f"{i}/{groups}", "--workers", str(workers(i)))
    run_module("-m", "preprocessing", "finish", str(work), str(out), *finish)


def assert_same_dataset(a: Path, b: Path) -> None:
    ma, mb = Manifest.load(a), Manifest.load(b)
    verify(a, ma)
    verify(b, mb)
    assert {**ma.stats, "seconds": 0} == {**mb.stats, "seconds": 0}
    assert ma.shards == mb.shards        # names, splits, sizes and sha256 of every shard
    da, db = ma.__dict__.copy(), mb.__dict__.copy()
    da["stats"] = db["stats"] = None
    assert da == db
    assert (a / "npmi.tsv").read_bytes() == (b / "npmi.tsv").read_bytes()
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())


@pytest.mark.parametrize("groups, options", [
    (3, ["--min-count", "3", "--valid-fraction", "0.1", "--shard-tokens", "60000"]),
    # shards larger than a group's share: one shard joined from the fragments of 3+ groups
    (6, ["--min-count", "3", "--valid-records", "rec6", "--shard-tokens", "1500000",
         "--seed", "7"]),
], ids=["small-shards", "shards-span-groups"])
@pytest.mark.slow
def test_stages_give_the_build_dataset(tmp_path, groups, options):
    genome = _genome(tmp_path)
    ref = tmp_path / "ref"
    run_module("-m", "preprocessing", "build", str(genome), str(ref), *options)
    work, out = tmp_path / "work", tmp_path / "out"
    _stages(genome, work, out, groups, options, workers=lambda i: 2 if i == 1 else 1,
            finish=("--keep-work",))
    assert_same_dataset(ref, out)
    m = Manifest.load(out)
    assert m.stats["records"] == len(LENGTHS) and m.stats["empty_records"] == 1
    assert m.stats["short_records"] == 1
    assert m.split_shards("train") and m.split_shards("valid")
    # every group cut a contiguous run of pieces holding about 1/N of the bases
    with np.load(work / "plan.npz") as plan:
        start = plan["piece_start"]
    bases = np.concatenate([np.load(work / f"counts-{i}.npz")["bases"] for i in range(groups)])
    order = np.concatenate([np.load(work / f"counts-{i}.npz")["piece"] for i in range(groups)])
    per_piece = bases[np.argsort(order)]
    share = [per_piece[start[g]:start[g + 1]].sum() for g in range(groups)]
    assert max(share) - min(share) <= 2 * per_piece.max(), share
    parts = [json.loads((work / f"shards-{i}.json").read_text()) for i in range(groups)]
    fragments = [f for p in parts for f in p["fragments"]]
    # --keep-work: WORK still holds every part (finish links or copies, never moves)
    assert all((work / e["path"]).is_file() for p in parts for e in p["shards"] + p["fragments"])
    assert fragments                   # some shards were joined by `finish`
    if groups == 6:                    # the first shard spans more than two groups
        first = {f["group"] for f in fragments if f["shard"] == 0 and f["split"] == "train"}
        assert len(first) >= 3, first


@pytest.mark.slow
def test_lambda_with_an_empty_group_matches_build(tmp_path, tiny_dataset):
    work, out = tmp_path / "work", tmp_path / "lambda"
    # lambda is one record: group 1 of 2 has nothing, and the dataset is still build's
    _stages(LAMBDA, work, out, 2, ["--min-count", "5", "--valid-fraction", "0.1", "--seed", "0",
                                   "--shard-tokens", "20000"])
    assert_same_dataset(tiny_dataset, out)
    # same stages again, same parameters: the published dataset is up to date
    _stages(LAMBDA, work, out, 2, ["--min-count", "5", "--valid-fraction", "0.1", "--seed", "0",
                                   "--shard-tokens", "20000"])
    assert_same_dataset(tiny_dataset, out)


@pytest.mark.slow
def test_external_table_gives_the_build_dataset(tmp_path, genemask_csv):
    options = ["--npmi-table", str(genemask_csv), "--valid-fraction", "0.1",
               "--shard-tokens", "20000"]
    ref = tmp_path / "ref"
    run_module("-m", "preprocessing", "build", str(LAMBDA), str(ref), *options)
    _stages(LAMBDA, tmp_path / "work", tmp_path / "out", 2, options)
    assert_same_dataset(ref, tmp_path / "out")


def _fails(*args, fragment: str) -> str:
    res = run_module("-m", "preprocessing", *args, check=False)
    assert res.returncode == 2, res.stdout + res.stderr
    assert fragment in res.stderr, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    return res.stderr


@pytest.mark.slow
def test_missing_or_foreign_parts_are_refused(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    opts = ["--min-count", "5", "--shard-tokens", "20000"]
    _fails("count", str(LAMBDA), str(work), "--group", "2/2", *opts, fragment="--group")
    _fails("table", str(work), fragment="job.json: missing")
    run_module("-m", "preprocessing", "count", str(LAMBDA), str(work), "--group", "0/3", *opts)
    # a sibling task given other options does not mix its counts into this job
    _fails("count", str(LAMBDA), str(work), "--group", "1/3", *opts, "--min-count", "6",
           fragment="holds another job (different --min-count)")
    _fails("count", str(LAMBDA), str(work), "--group", "1/2", *opts,
           fragment="holds another job (different groups)")
    _fails("table", str(work), fragment="2 of 3 `count` parts missing (counts-1.npz, counts-2.npz)")
    for i in (1, 2):
        run_module("-m", "preprocessing", "count", str(LAMBDA), str(work), "--group", f"{i}/3",
                   *opts)
    _fails("shard", str(LAMBDA), str(work), "--group", "0/3", fragment="run the `table` stage")
    run_module("-m", "preprocessing", "table", str(work))
    other = tmp_path / "other.fa"
    _synthetic(other, [5000])
    _fails("shard", str(other), str(work), "--group", "0/3", fragment="differs from the genome")
    _fails("shard", str(LAMBDA), str(work), "--group", "0/2", fragment="counted in 3 groups")
    run_module("-m", "preprocessing", "shard", str(LAMBDA), str(work), "--group", "0/3")
    run_module("-m", "preprocessing", "shard", str(LAMBDA), str(work), "--group", "2/3")
    _fails("finish", str(work), str(out), fragment="1 of 3 `shard` parts missing (shards-1.json)")
    run_module("-m", "preprocessing", "shard", str(LAMBDA), str(work), "--group", "1/3")
    (work / "train-00001.h5").unlink()      # a shard lost after its task finished
    _fails("finish", str(work), str(out), fragment="train-00001.h5: missing; rerun `shard` task 0")
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    # a table altered after the `table` stage is not used
    (work / "npmi.tsv").write_text((work / "npmi.tsv").read_text() + "\n")
    _fails("shard", str(LAMBDA), str(work), "--group", "1/3", fragment="not the table of")
    _fails("finish", str(work), str(out), fragment="not the table of")
    assert not out.exists()
    run_module("-m", "preprocessing", "table", str(work))
    for i in range(3):
        run_module("-m", "preprocessing", "shard", str(LAMBDA), str(work), "--group", f"{i}/3")
    from cmgems.io import exclusive_lock
    with exclusive_lock(tmp_path / ".out.lock", "test"):       # a build of OUT_DIR under way
        _fails("finish", str(work), str(out), fragment=f"is in use by pid {os.getpid()}")
    assert not out.exists() and (work / "job.json").is_file()
    run_module("-m", "preprocessing", "finish", str(work), str(out))
    assert len(ShardSet(out, "train")) > 0


# ---- on a real Slurm ----

@pytest.mark.slow
def test_slurm_job_array_builds_the_build_dataset(cluster, tmp_path):
    from launch_checks import clean_env

    genome = _genome(tmp_path)
    options = ["--min-count", "3", "--valid-fraction", "0.1", "--shard-tokens", "60000"]
    ref = tmp_path / "ref"
    run_module("-m", "preprocessing", "build", str(genome), str(ref), *options)
    env = clean_env()
    env.update(SLURM_CONF=str(cluster.conf), CMGEMS_PYTHON=sys.executable)
    env.pop("CMGEMS_ROOT", None)
    logs = tmp_path / "logs"
    logs.mkdir()
    script = str(ROOT / "launchers" / "slurm" / "preprocess.sbatch")
    done = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}

    def all_logs() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(logs.iterdir()))

    # a bad option fails the submitting job before any stage is submitted
    bad = cluster.sbatch(f"--output={logs / 'bad-%j.out'}", script, genome.name, "out",
                         "--groups", "3", "--min-count", "many", env=env, cwd=tmp_path)
    assert cluster.wait_state(bad, done, timeout=60)["JobState"] == "FAILED", all_logs()
    assert "--min-count" in all_logs() and "count=" not in all_logs(), all_logs()
    # --wait (as docs/multinode.md does it): returns once the chain is submitted
    job = cluster.sbatch("--wait", f"--output={logs / 'submit-%j.out'}", "--cpus-per-task=1",
                         script, genome.name, "out", "--groups", "3", *options, env=env,
                         cwd=tmp_path)
    assert cluster.job(job)["JobState"] == "COMPLETED", all_logs()
    ids = dict(re.findall(r"(count|table|shard|finish)=(\d+)", all_logs()))
    assert set(ids) == {"count", "table", "shard", "finish"}, all_logs()
    rec = cluster.wait_state(int(ids["finish"]), done, timeout=120)
    assert rec["JobState"] == "COMPLETED", all_logs()
    names = {p.name for p in logs.iterdir()}
    for stage, tasks in (("count", 3), ("shard", 3), ("table", 1), ("finish", 1)):
        assert len([n for n in names if n.startswith(f"cmgems-{stage}-")]) == tasks, names
    assert "--group 2/3" in all_logs()
    assert_same_dataset(ref, tmp_path / "out")
    assert not (tmp_path / "out.work").exists()


@pytest.mark.parametrize("table", ["counted", "external"])
def test_array_and_build_give_the_same_bytes_for_every_shard(tmp_path, table):
    """In process (fast): the sha256 of every shard, npmi.tsv and the manifest of an array run
    equal build's. The external table holds values just above float16 rounding midpoints, where
    rounding float64 -> float32 -> float16 and float64 -> float16 disagree: one rounding path
    (npmi.tsv read back to the shards' dtype) gives the same bytes whichever stage cuts."""
    import io
    from cmgems.data import npmi_table
    from preprocessing.array import count_stage, finish_stage, shard_stage, table_stage
    from preprocessing.build import BuildConfig, build
    genome = tmp_path / "g.fa"
    _synthetic(genome, [300_000, 40_000, 150_000], seed=11, n_every=30_000)
    extra = {}
    if table == "external":
        values = 1 + (2 * np.arange(4096) + 1) * 2.0 ** -11 + 2.0 ** -30
        assert not np.array_equal(values.astype(np.float16),
                                  values.astype(np.float32).astype(np.float16))
        extra["npmi_table"] = tmp_path / "mid.tsv"
        npmi_table.write_table(extra["npmi_table"], values)
    opts = dict(genome=genome, min_count=3, valid_fraction=0.1, shard_tokens=40_000,
                piece_bases=60_000, **extra)
    quiet = io.StringIO()
    build(BuildConfig(out_dir=tmp_path / "ref", **opts), out=quiet)
    work, out = tmp_path / "work", tmp_path / "out"
    for i in range(2):
        count_stage(BuildConfig(out_dir=work, **opts), work, (i, 2), out=quiet)
    table_stage(work, out=quiet)
    for i in range(2):
        shard_stage(genome, work, (i, 2), out=quiet)
    finish_stage(work, out, out=quiet)
    assert_same_dataset(tmp_path / "ref", out)
    assert len(Manifest.load(out).shards) > 4
