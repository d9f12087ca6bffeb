"""Finetuning and the few-shot protocol on real files: a 10-shot TSV in GeneMask's prom-core layout
(made in conftest from the bundled genomes), GUE-shaped CSV folders built here, a real SQLite MLflow
store, and the CLI in a real subprocess."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from cmgems.errors import InputError
from cmgems.finetune import FinetuneConfig, Tracking, fewshot, finetune_task, model_info
from cmgems.tasks import load_task_file, shot_blocks, num_labels
from cmgems.tokens import CLS_ID, PAD_ID, SEP_ID, kmer_ids, write_vocab
from conftest import run_module


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids OpenMP spin-waiting
    against other processes (a 10-20x slowdown seen under load); restored afterwards."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_model(path: Path, seed: int = 0, positions: int = 512) -> Path:
    """A tiny exported DNABERT-shaped model: BertForMaskedLM.save_pretrained + vocab.txt (k=6)."""
    import torch
    from transformers import BertConfig, BertForMaskedLM
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=4101, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=positions)
    path.mkdir(parents=True, exist_ok=True)
    BertForMaskedLM(cfg).save_pretrained(path)
    write_vocab(path / "vocab.txt", 6)
    return path


def kmer_text_to_nt(text: str) -> str:
    toks = text.split()
    return toks[0] + "".join(t[-1] for t in toks[1:])


def write_csv(path: Path, rows) -> Path:
    path.write_text("sequence,label\n" + "".join(f"{s},{y}\n" for s, y in rows))
    return path


def easy_rows(rng, n, length=40):
    """Class 0: A/T-only sequences, class 1: C/G-only: separable by any working finetuning."""
    out = []
    for i in range(n):
        y = i % 2
        out.append(("".join(rng.choice(list("AT" if y == 0 else "CG"), length)), y))
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def prom_test(tmp_path_factory, prom_core) -> Path:
    """The first 30 rows of each class of the prom-core-shaped test set (speed), same TSV format."""
    lines = (prom_core / "test.tsv").read_text().splitlines()
    body = lines[1:]
    pick = [r for r in body if r.endswith("\t0")][:30] + [r for r in body if r.endswith("\t1")][:30]
    out = tmp_path_factory.mktemp("prom") / "test.tsv"
    out.write_text("\n".join([lines[0], *pick]) + "\n")
    return out


def test_fewshot_tsv_decodes_to_the_same_ids_as_raw_nucleotides(tmp_path, prom_core):
    train = load_task_file(prom_core / "10" / "train.tsv", 6)
    assert len(train) == 20 and sorted(np.bincount(train.labels)) == [10, 10]
    lines = (prom_core / "10" / "train.tsv").read_text().splitlines()
    rows = [line.split("\t") for line in lines[1:]]
    nts = [kmer_text_to_nt(s.strip('"')) for s, _ in rows]
    csv = load_task_file(write_csv(tmp_path / "t.csv", zip(nts, [int(y) for _, y in rows])), 6)
    assert np.array_equal(csv.input_ids, train.input_ids)
    assert np.array_equal(csv.labels, train.labels)
    first = kmer_ids(nts[0], 6)
    assert train.input_ids[0, 0] == CLS_ID and train.input_ids[0, len(first) + 1] == SEP_ID
    assert np.array_equal(train.input_ids[0, 1:len(first) + 1], first)


def test_truncation_is_counted_and_error_mode_names_the_line(tmp_path):
    rows = [("ACGT" * 10, 0), ("ACGTACGTAC", 1), ("A" * 30, 0)]
    path = write_csv(tmp_path / "x.csv", rows)
    data = load_task_file(path, 6, max_length=12)
    assert data.truncated == 2
    assert data.lengths.tolist() == [12, 7, 12]
    assert (data.input_ids[1, 7:] == PAD_ID).all() and data.input_ids[0, 11] == SEP_ID
    with pytest.raises(InputError, match=r"x\.csv, line 2: .*exceed max_length 12"):
        load_task_file(path, 6, max_length=12, overflow="error")


@pytest.mark.slow
def test_fewshot_on_real_prom_core_logs_parent_and_child_runs(model, prom_core, prom_test,
                                                              tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out_json = tmp_path / "res" / "fewshot.json"
    res = fewshot(model, prom_core / "10" / "train.tsv", prom_test, runs=2, seed=3,
                  tracking=Tracking(uri, "fs-test"), name="prom-core/10", out_json=out_json)
    assert [r["seed"] for r in res["runs"]] == [3, 4]
    # 20 examples, batch 5, 20 epochs: the reference protocol's 80 optimizer steps per run.
    assert [r["steps"] for r in res["runs"]] == [80, 80]
    for name in ("accuracy", "f1", "mcc"):
        vals = [r["metrics"][name] for r in res["runs"]]
        assert res["mean"][name] == pytest.approx(np.mean(vals))
        assert res["std"][name] == pytest.approx(np.std(vals, ddof=1))
    assert 0.0 <= res["mean"]["accuracy"] <= 1.0
    assert json.loads(out_json.read_text())["mean"] == res["mean"]

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("fs-test")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.run_id == res["mlflow_run_id"] and parent.info.status == "FINISHED"
    assert parent.data.params["lr"] == "0.0001" and parent.data.params["epochs"] == "20"
    assert parent.data.metrics["test_mean_mcc"] == pytest.approx(res["mean"]["mcc"])
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    by_seed = {c.data.params["seed"]: c for c in children}
    assert set(by_seed) == {"3", "4"}
    assert by_seed["4"].data.metrics["test_accuracy"] == pytest.approx(
        res["runs"][1]["metrics"]["accuracy"])


def test_runs_are_reproducible_and_seeds_differ(model, prom_core, prom_test):
    cfg = FinetuneConfig(epochs=2)
    a = fewshot(model, prom_core / "10" / "train.tsv", prom_test, runs=1, seed=7, config=cfg)
    b = fewshot(model, prom_core / "10" / "train.tsv", prom_test, runs=1, seed=7, config=cfg)
    c = fewshot(model, prom_core / "10" / "train.tsv", prom_test, runs=1, seed=8, config=cfg)
    assert a["runs"][0]["train_loss"] == b["runs"][0]["train_loss"]
    assert a["runs"][0]["metrics"] == b["runs"][0]["metrics"]
    assert a["runs"][0]["train_loss"] != c["runs"][0]["train_loss"]


def test_gue_folder_finetuning_learns_a_separable_task(model, tmp_path):
    rng = np.random.default_rng(0)
    task = tmp_path / "easy"
    task.mkdir()
    write_csv(task / "train.csv", easy_rows(rng, 48))
    write_csv(task / "dev.csv", easy_rows(rng, 16))
    write_csv(task / "test.csv", easy_rows(rng, 40))
    cfg = FinetuneConfig(lr=1e-3, epochs=6, batch_size=8, warmup_steps=2, eval_steps=6)
    res = finetune_task(model, task, runs=1, seed=0, config=cfg)
    run = res["runs"][0]
    assert run["steps"] == 36
    assert run["dev_metrics"] is not None and run["dev_metrics"]["accuracy"] >= 0.9
    assert run["metrics"]["accuracy"] >= 0.9 and run["metrics"]["mcc"] >= 0.8


def test_shot_blocks_split_a_multi_run_file(tmp_path):
    rng = np.random.default_rng(1)
    rows = easy_rows(rng, 12, length=10)  # 3 blocks of 2 shots x 2 classes, alternating labels
    data = load_task_file(write_csv(tmp_path / "s.csv", rows), 6)
    blocks = shot_blocks(data, num_labels(data), 2)
    assert [b.tolist() for b in blocks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    rows[5] = (rows[5][0], 0)  # block 2 now holds 3 of class 0
    bad = load_task_file(write_csv(tmp_path / "b.csv", rows), 6)
    with pytest.raises(InputError, match=r"b\.csv, lines 6-9: block 2"):
        shot_blocks(bad, 2, 2)


def test_tracking_failure_does_not_stop_the_evaluation(model, prom_core, prom_test, tmp_path,
                                                       caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    tracking = Tracking(f"sqlite:///{blocker / 'mlflow.db'}")
    with caplog.at_level(logging.WARNING, logger="cmgems.finetune"):
        res = fewshot(model, prom_core / "10" / "train.tsv", prom_test, runs=1, seed=0,
                      config=FinetuneConfig(epochs=1), tracking=tracking)
    assert len(res["runs"]) == 1 and res["mlflow_run_id"] is None
    assert "MLflow tracking disabled" in caplog.text


TSV_HEAD = '"sequence"\t"label"\n'


@pytest.mark.parametrize("name,content,pattern", [
    ("h.csv", "seq,lab\nACGTACGT,0\n", r"h\.csv, line 1: header"),
    ("l.csv", "sequence,label\nACGTACGT,0\nACGTACGT,x\n", r"l\.csv, line 3: label 'x'"),
    ("s.csv", "sequence,label\nACGTACGT,0\nACGXACGT,1\n", r"s\.csv, line 3: symbol 'X'"),
    ("short.csv", "sequence,label\nACGTACGT,0\nACG,1\n", r"short\.csv, line 3: .*shorter"),
    ("f.csv", "sequence,label\nACGTACGT,0,1\n", r"f\.csv, line 2: expected 2 fields"),
    ("k.tsv", TSV_HEAD + '"ACGTA CGTAC"\t0\n', r"k\.tsv, line 2: k-mers of length 5"),
    ("o.tsv", TSV_HEAD + '"ACGTAC CGTACG GGGGGG"\t0\n', r"o\.tsv, line 2: k-mer 3"),
    ("w.tsv", TSV_HEAD + '"ACGTAC  CGTACG"\t0\n', r"w\.tsv, line 2: not a sequence"),
    ("x.txt", "sequence,label\n", r"x\.txt: unknown task file type"),
])
def test_bad_task_files_name_file_and_line(tmp_path, name, content, pattern):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InputError, match=pattern):
        load_task_file(path, 6)


def test_unknown_test_label_and_bad_model_dir(model, tmp_path):
    task = tmp_path / "t"
    task.mkdir()
    write_csv(task / "train.csv", [("ACGTACGTAA", 0), ("TTGTACGTAA", 1)])
    write_csv(task / "test.csv", [("ACGTACGTAA", 0), ("TTGTACGTAA", 2)])
    with pytest.raises(InputError, match=r"test\.csv, line 3: unknown label 2"):
        finetune_task(model, task)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(
        {"vocab_size": 4101, "max_position_embeddings": 512}))
    with pytest.raises(InputError, match=r"vocab\.txt: no such file"):
        model_info(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps(
        {"vocab_size": 4100, "max_position_embeddings": 512}))
    with pytest.raises(InputError, match="field vocab_size"):
        model_info(tmp_path / "m")
    with pytest.raises(InputError, match="batch_size"):
        FinetuneConfig(batch_size=0)


def test_help_documents_every_option():
    from launchers.finetune import build_parser
    parser = build_parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings or action.dest} has no help"


def test_cli_bad_input_exits_2_and_writes_nothing(model, tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text(TSV_HEAD + '"AAAAAA AAAAAC"\t0\n"AAAAAA AAAAAT"\tpromoter\n')
    out = tmp_path / "out.json"
    res = run_module("-m", "launchers.finetune", str(model), "--train", str(bad), "--test",
                     str(bad), "--out", str(out), "--runs-root", str(tmp_path / "runs"),
                     check=False, timeout=300)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("error: ") and "bad.tsv, line 3" in res.stderr
    assert not out.exists()


def test_cli_in_process_maps_options_and_writes_json(model, tmp_path, capsys):
    from launchers.finetune import main
    rng = np.random.default_rng(2)
    task = tmp_path / "task"
    task.mkdir()
    for split, n in (("train", 16), ("dev", 8), ("test", 8)):
        write_csv(task / f"{split}.csv", easy_rows(rng, n, length=20))
    out = tmp_path / "r.json"
    rc = main([str(model), "--task-dir", str(task), "--runs", "2", "--seed", "5", "--epochs", "1",
               "--lr", "2e-4", "--batch-size", "4", "--max-length", "10", "--no-tracking",
               "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert [r["seed"] for r in res["runs"]] == [5, 6] and [r["steps"] for r in res["runs"]] == [4, 4]
    assert res["params"]["lr"] == 2e-4 and res["params"]["max_length"] == 10
    assert res["truncated"] == {"train": 16, "test": 8, "dev": 8}
    assert json.loads(capsys.readouterr().out)["mean"] == res["mean"]
