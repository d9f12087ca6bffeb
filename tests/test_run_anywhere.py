"""launchers/pretrain.py as a user runs it: from an empty folder outside the checkout, with the
defaults of the quick run; its --help shows those defaults; bad input fails before DeepSpeed
starts; a normal run's output is plain lines, without notices that are not about the run."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cmgems.pretrain import deepspeed_env
from cmgems.pretrain.config import PretrainConfig
from cmgems.options import load_file
from conftest import ROOT

PRETRAIN = str(ROOT / "launchers" / "pretrain.py")
QUICK = ROOT / "launchers" / "configs" / "quick.yaml"
# What a run prints once DeepSpeed has started; none of it may appear before a refusal.
STARTED = ("rank(s) on", "deepspeed_shm_comm", "[WARNING]")


def launch(*args: str, cwd: Path, env: dict | None = None, timeout: int = 60):
    """`python /path/to/launchers/pretrain.py ARGS` in `cwd`, as a script (not -m): the checkout's
    cmgems, found by the launcher itself."""
    full = {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    full.update(PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, PRETRAIN, *args], cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_help_shows_the_defaults_a_run_without_config_uses(tmp_path):
    text = " ".join(launch("--help", cwd=tmp_path).stdout.split())
    quick = load_file(QUICK, PretrainConfig)
    assert quick["max_steps"] == 200 and quick["max_length"] == 128
    for name, value in quick.items():
        flag = "--" + name.replace("_", "-")
        shown = re.search(rf"{flag} [A-Z]+ .*?\(default: ([^)]*)\)", text)
        assert shown and shown.group(1) == repr(value), (name, shown and shown.group(1))
    assert "(default: 1000)" not in text.split("--max-steps")[1][:120]
    assert "quick.yaml over the built-in defaults" in text


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--data-dir", "nowhere", "--genome", "nope.fa"],
     "nowhere: holds no dataset (manifest.json), and the genome to build it from, nope.fa, is "
     "not a file"),
    (["--resume"], "--resume needs the run to continue"),
    (["--ds-config", "missing.json"], "missing.json: cannot read DeepSpeed config"),
    (["--config", "nope.yaml"], "nope.yaml: cannot read config"),
    (["--init-from", "no-model"], "no-model: not a model directory (no config.json)"),
])
def test_bad_input_fails_before_deepspeed_starts(tmp_path, args, message):
    res = launch(*args, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last and "Traceback" not in res.stderr
    assert not any(s in res.stdout + res.stderr for s in STARTED), res.stdout + res.stderr
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.slow
def test_an_output_dir_of_an_earlier_run_is_refused_before_deepspeed_starts(tmp_path,
                                                                            tiny_dataset):
    run = tmp_path / "runs" / "old"
    (run / "checkpoints" / "step_00000004").mkdir(parents=True)
    (run / "checkpoints" / "latest_complete").write_text("step_00000004\n")
    res = launch("--data-dir", str(tiny_dataset), "--run-name", "old", cwd=tmp_path)
    assert res.returncode == 2
    assert f"error: {Path('runs') / 'old'}: holds checkpoints of an earlier run; pass --resume" \
        in res.stderr
    assert not any(s in res.stdout + res.stderr for s in STARTED), res.stderr


def stale_extension_cache(tmp_path: Path) -> Path:
    """A private extension cache for one run, empty but for the lock a killed compile leaves."""
    root = tmp_path / "torch_extensions"
    (root / "deepspeed_shm_comm").mkdir(parents=True)
    (root / "deepspeed_shm_comm" / "lock").touch()
    return root


@pytest.mark.slow
def test_default_run_from_an_empty_folder(tmp_path):
    """The quick run's launcher, shortened to 4 steps, from a folder outside the checkout, its
    stderr a file (as under Slurm), a stale compile lock in an otherwise empty extension cache
    (one rank builds no op into it)."""
    work = tmp_path / "work"
    work.mkdir()
    cache = stale_extension_cache(tmp_path)
    # warmup beyond max_steps: DeepSpeed warns of it, on stdout unless the launcher moves it
    res = launch("--max-steps", "4", "--eval-interval", "2", "--eval-batches", "1",
                 "--log-interval", "2", "--warmup-steps", "10", cwd=work, timeout=600,
                 env={"TORCH_EXTENSIONS_DIR": str(cache)})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    # everything in the working directory: the dataset built from the shipped genome, the run
    assert (work / "data" / "ecoli_k12_mg1655" / "manifest.json").is_file()
    # stdout is the result alone (DeepSpeed's notices, an op build's output: stderr)
    assert len(res.stdout.strip().splitlines()) == 1, res.stdout[-3000:]
    result = json.loads(res.stdout)
    out = work / result["output_dir"]
    assert result["step"] == 4 and (out / "export" / "config.json").is_file()
    assert (work / "runs" / "mlflow.db").is_file()
    assert "using the one shipped with cmgems" in res.stderr
    # the stale lock: found, removed, said
    assert not (cache / "deepspeed_shm_comm" / "lock").exists()
    assert "removed a stale compile lock of DeepSpeed's deepspeed_shm_comm op" in res.stderr
    # one rank has no collective to speed up: DeepSpeed's shared-memory op is not compiled
    assert not deepspeed_env.is_built(deepspeed_env.SHM_COMM_OP, cache)
    assert "building DeepSpeed's" not in res.stderr and "built successfully" not in res.stderr
    # a log file reads as lines: no bar's carriage returns, a plain progress line every 2 steps
    assert "\r" not in res.stderr
    steps = re.findall(rf"^{re.escape(out.name)}: (\d)/4 steps", res.stderr, re.M)
    assert steps == ["2", "4"], res.stderr
    # one timestamp format: DeepSpeed's warning of the short warmup in ours, no line in its own
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d DeepSpeed WARNING total_num_steps 4 is "
                     r"less than warmup_num_steps", res.stderr, re.M), res.stderr[-3000:]
    assert not re.search(r"^\[\d{4}-|^\d{4}/\d\d/\d\d ", res.stderr, re.M), res.stderr[-3000:]
    # no notice that is not about this run
    for notice in deepspeed_env.NOT_ABOUT_THE_RUN:
        assert notice not in res.stdout + res.stderr
    assert "Writing model shards" not in res.stderr
    assert res.stderr.count("cmgems INFO optimizer: ") == 1, res.stderr[-3000:]  # said once


def _help_default(parser, flag: str) -> str:
    action = next(a for a in parser._actions if flag in a.option_strings)
    return re.search(r"\(default: ([^)]*)\)", action.help).group(1)


@pytest.mark.slow
def test_every_seed_defaults_to_the_one_constant():
    from cmgems.compare import config as compare
    from cmgems.evaluation import finetune
    from cmgems.options import DEFAULT_SEED
    from launchers import compare as compare_cli, finetune as finetune_cli, gue as gue_cli
    from preprocessing.__main__ import build_parser
    from preprocessing.build import BuildConfig

    assert DEFAULT_SEED == 42
    fields = {PretrainConfig: "seed", BuildConfig: "seed", finetune.EvalRuns: "seed",
              compare.CompareConfig: "fewshot_seed"}
    for cls, name in fields.items():
        assert cls.__dataclass_fields__[name].default == DEFAULT_SEED, cls
    for parser, flag in ((build_parser(), "--seed"), (finetune_cli.build_parser(), "--seed"),
                         (gue_cli.build_parser(), "--seed"),
                         (compare_cli.build_parser(), "--fewshot-seed")):
        assert _help_default(parser, flag) == "42", (parser.prog, flag)
    text = " ".join(launch("--help", cwd=ROOT).stdout.split())
    assert re.search(r"--seed INT [^(]*\(default: 42\)", text)


def test_preprocessing_help_lists_its_commands(tmp_path):
    res = subprocess.run([sys.executable, "-m", "preprocessing", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stderr == ""
    listed = re.findall(r"^  (\w+)  ", res.stdout, re.M)
    assert listed == ["build", "npmi", "count", "table", "shard", "finish"]
    res = subprocess.run([sys.executable, "-m", "preprocessing", "bulid"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.splitlines()[-1] == "error: unknown command 'bulid'"


def test_every_config_the_docs_and_job_scripts_name_exists():
    """`--config FILE` in README, docs and the Slurm scripts' examples: a file that is shipped."""
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "launchers" / "slurm").glob("*.sbatch"))]
    named = {(path.name, m) for path in texts
             for m in re.findall(r"--config[ =]([\w./-]+\.(?:ya?ml|json))", path.read_text())}
    assert ("pretrain.sbatch", "launchers/configs/reference.yaml") in named
    missing = [(where, name) for where, name in named if not (ROOT / name).is_file()]
    assert not missing, missing
