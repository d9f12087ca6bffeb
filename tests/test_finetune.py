"""Finetuning and the few-shot protocol on real files made here (GeneMask's TSV format from the
bundled E. coli genome, GUE-shaped CSV folders), a real SQLite MLflow store, and the CLI in a real
subprocess."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from cmgems.errors import InputError
from cmgems.evaluation.finetune import FinetuneConfig, Tracking, fewshot, finetune_task, model_info
from cmgems.options import DEFAULT_SEED
from cmgems.evaluation.shots import shot_pool
from cmgems.evaluation.tasks import load_task_file, num_labels
from cmgems.data.tokens import CLS_ID, PAD_ID, SEP_ID, kmer_ids, write_vocab
from conftest import run_module, shared_file
from fewshot_files import (TSV_HEAD, easy_rows, genome_windows, shuffled_pool, write_csv,
                           write_fewshot_tsv)

TINY = FinetuneConfig(epochs=1, max_length=40)  # a few optimizer steps per run


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids OpenMP spin-waiting
    against other processes (a 10-20x slowdown seen under load); restored afterwards."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_model(path: Path, seed: int = 0, positions: int = 512, meta: dict | None = None) -> Path:
    """A tiny exported DNABERT-shaped model: BertForMaskedLM.save_pretrained + vocab.txt (k=6),
    and cmgems.json as the export writes it."""
    import torch
    from transformers import BertConfig, BertForMaskedLM
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=4101, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=positions)
    path.mkdir(parents=True, exist_ok=True)
    BertForMaskedLM(cfg).save_pretrained(path)
    write_vocab(path / "vocab.txt", 6)
    (path / "cmgems.json").write_text(json.dumps({"k": 6, **(meta or {})}))
    return path


def kmer_text_to_nt(text: str) -> str:
    toks = text.split()
    return toks[0] + "".join(t[-1] for t in toks[1:])


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "tiny",
                      meta={"run_name": "pre", "step": 6, "mode": "cm_gems",
                            "mlflow_run_id": "0123456789abcdef"})


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A shuffled 300-row 3-class "10-shot" pool (100 per class: the layout of GeneMask's
    Splice-40 10-shot file), a one-draw 10-shot file (10 per class),
    a 2-class 10-shot file and 2-class pool, and test files: GeneMask's TSV format, windows of
    the bundled genome."""
    d = tmp_path_factory.mktemp("fewshot")
    rng = np.random.default_rng(0)
    return {
        "pool3": write_fewshot_tsv(d / "splice" / "10" / "train.tsv",
                                   shuffled_pool(rng, [100] * 3)),
        "test3": write_fewshot_tsv(d / "splice" / "test.tsv", shuffled_pool(rng, [10] * 3)),
        "one_draw": write_fewshot_tsv(d / "p" / "10" / "train.tsv", shuffled_pool(rng, [10, 10])),
        "pool2": write_fewshot_tsv(d / "p" / "100" / "train.tsv", shuffled_pool(rng, [60, 40])),
        "test2": write_fewshot_tsv(d / "p" / "test.tsv", shuffled_pool(rng, [15, 15])),
    }


# --------------------------------------------------------------------------- task files
def test_fewshot_tsv_decodes_to_the_same_ids_as_raw_nucleotides(files, tmp_path):
    train = load_task_file(files["one_draw"], 6)
    assert len(train) == 20 and sorted(np.bincount(train.labels)) == [10, 10]
    rows = [line.split("\t") for line in files["one_draw"].read_text().splitlines()[1:]]
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


# --------------------------------------------------------------------------- the draw
def test_each_run_draws_its_own_n_per_class_from_a_shuffled_pool(model, files):
    """The issue's case: a shuffled 300-row, 3-class "10-shot" file. Trained whole it would be a
    100-shot run; drawn, each of 10 runs trains on its own 10 per class."""
    res = fewshot(model, files["pool3"], files["test3"], shots=10, runs=10, seed=0, config=TINY)
    labels = load_task_file(files["pool3"], 6).labels
    sets = [tuple(r["train_rows"]) for r in res["runs"]]
    assert [len(s) for s in sets] == [30] * 10
    assert len(set(sets)) == 10  # every run its own draw
    for s in sets:
        assert len(set(s)) == 30 and np.bincount(labels[list(s)]).tolist() == [10, 10, 10]
    assert res["shots"] == 10 and res["pool"]["size"] == 300
    assert res["pool"]["per_class"] == [100, 100, 100]
    assert [r["seed"] for r in res["runs"]] == list(range(10))
    # The same seed draws the same sets (and trains the same way); another seed draws others.
    again = fewshot(model, files["pool3"], files["test3"], shots=10, runs=2, seed=0, config=TINY)
    assert [tuple(r["train_rows"]) for r in again["runs"]] == sets[:2]
    assert [r["metrics"] for r in again["runs"]] == [r["metrics"] for r in res["runs"][:2]]
    other = fewshot(model, files["pool3"], files["test3"], shots=10, runs=1, seed=5, config=TINY)
    assert tuple(other["runs"][0]["train_rows"]) not in sets
    # Anyone can recompute a run's rows from (seed, run) alone.
    assert tuple(shot_pool(files["pool3"], labels, 3, 10).rows(0, 3)) == sets[3]


def test_shots_inferred_only_from_a_one_draw_file(model, files, caplog):
    pool2 = load_task_file(files["pool2"], 6)
    with pytest.raises(InputError, match=r"train\.tsv: holds \[60, 40\] examples per class, not "
                                         r"one draw .*--shots"):
        shot_pool(files["pool2"], pool2.labels, 2, None)
    # 100 of every class in a folder named 10: trained whole, a 100-shot run reported as 10-shot.
    pool3 = load_task_file(files["pool3"], 6)
    with pytest.raises(InputError, match=r"holds 100 examples of every class but sits in a "
                                         r"folder named 10: give --shots"):
        shot_pool(files["pool3"], pool3.labels, 3, None)
    with caplog.at_level(logging.WARNING, logger="cmgems.finetune"):
        res = fewshot(model, files["one_draw"], files["test2"], runs=2, config=TINY)
    assert res["shots"] == 10 and res["pool"]["size"] == 20
    assert res["runs"][0]["train_rows"] == res["runs"][1]["train_rows"] == list(range(20))
    assert "differ only in seed" in caplog.text


def test_a_larger_pool_gives_each_run_other_rows(model, files):
    """--train names the one-draw file (n = 10 inferred from it), --pool the larger file the
    runs draw from."""
    res = fewshot(model, files["one_draw"], files["test2"], pool=files["pool2"], runs=3,
                  config=TINY)
    pool_labels = load_task_file(files["pool2"], 6).labels
    assert res["shots"] == 10 and res["pool"]["path"] == str(files["pool2"])
    assert res["pool"]["size"] == 100 and res["pool"]["per_class"] == [60, 40]
    assert len({tuple(r["train_rows"]) for r in res["runs"]}) == 3
    for r in res["runs"]:
        assert np.bincount(pool_labels[r["train_rows"]]).tolist() == [10, 10]


def test_a_pool_short_of_n_in_a_class_is_an_error(model, files, tmp_path):
    with pytest.raises(InputError, match=r"class 1 has 40 examples, fewer than the 50 shots"):
        fewshot(model, None, files["test2"], pool=files["pool2"], shots=50, runs=1, config=TINY)
    # A training file named beside a pool is read even when --shots makes it unneeded.
    with pytest.raises(InputError, match=r"missing\.tsv: no such file"):
        fewshot(model, tmp_path / "missing.tsv", files["test2"], pool=files["pool2"], shots=5,
                runs=1, config=TINY)


# --------------------------------------------------------------------------- training, outputs
def test_runs_are_reproducible_and_seeds_differ(model, files):
    cfg = FinetuneConfig(epochs=2, max_length=40)
    a = fewshot(model, files["one_draw"], files["test2"], runs=1, seed=7, config=cfg)
    b = fewshot(model, files["one_draw"], files["test2"], runs=1, seed=7, config=cfg)
    c = fewshot(model, files["one_draw"], files["test2"], runs=1, seed=8, config=cfg)
    assert a["runs"][0]["train_loss"] == b["runs"][0]["train_loss"]
    assert a["runs"][0]["metrics"] == b["runs"][0]["metrics"]
    assert a["runs"][0]["train_loss"] != c["runs"][0]["train_loss"]


def test_gue_folder_finetuning_learns_a_separable_task(model, tmp_path):
    rng = np.random.default_rng(0)
    task = tmp_path / "easy"
    write_csv(task / "train.csv", easy_rows(rng, 48))
    write_csv(task / "dev.csv", easy_rows(rng, 16))
    write_csv(task / "test.csv", easy_rows(rng, 40))
    cfg = FinetuneConfig(lr=1e-3, epochs=6, batch_size=8, warmup_steps=2, eval_steps=6)
    res = finetune_task(model, task, runs=1, seed=0, config=cfg)
    run = res["runs"][0]
    assert run["steps"] == 36 and run["train_rows"] == "all" and res["shots"] == "all"
    assert run["dev_metrics"] is not None and run["dev_metrics"]["accuracy"] >= 0.9
    assert run["metrics"]["accuracy"] >= 0.9 and run["metrics"]["mcc"] >= 0.8
    assert run["precision"] == "fp32"  # auto and fp32 are fp32 on CPU


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_precisions_train_and_are_recorded(model, tmp_path, precision):
    """The GPU code path (autocast; fp16 with loss scaling) run on CPU, where autocast works too."""
    rng = np.random.default_rng(3)
    task = tmp_path / "easy"
    for split, n in (("train", 16), ("dev", 8), ("test", 8)):
        write_csv(task / f"{split}.csv", easy_rows(rng, n, length=20))
    cfg = FinetuneConfig(epochs=2, batch_size=4, grad_accum=2, precision=precision)
    run = finetune_task(model, task, runs=1, config=cfg)["runs"][0]
    assert run["precision"] == precision and run["steps"] == 4
    assert np.isfinite(run["train_loss"]) and np.isfinite(run["test_loss"])


def test_saved_classifier_reproduces_the_logged_predictions(model, files, tmp_path):
    """--save-model: the tested weights, loadable with transformers and the export's vocabulary;
    its predictions are the predictions file's."""
    import torch
    from transformers import AutoModelForSequenceClassification
    out, saved = tmp_path / "res" / "fs.json", tmp_path / "clf"
    res = fewshot(model, files["pool3"], files["test3"], shots=5, runs=1, seed=2, config=TINY,
                  out_json=out, save_model=saved)
    assert res["saved_model"] == str(saved) and not saved.with_name("clf.partial").exists()
    assert (saved / "vocab.txt").read_text() == (model / "vocab.txt").read_text()
    meta = json.loads((saved / "cmgems.json").read_text())
    assert meta["base"]["mlflow_run_id"] == "0123456789abcdef" and meta["seed"] == 2
    pred_path = out.with_name("fs.predictions.tsv")
    assert res["predictions"] == str(pred_path)
    table = np.loadtxt(pred_path, dtype=np.int64, skiprows=1, delimiter="\t")
    assert pred_path.read_text().splitlines()[0] == "row\tline\tlabel\trun0"
    test = load_task_file(files["test3"], 6, max_length=40)
    assert table[:, 0].tolist() == list(range(30)) and table[:, 2].tolist() == test.labels.tolist()
    clf = AutoModelForSequenceClassification.from_pretrained(saved).eval()
    with torch.no_grad():
        ids = torch.from_numpy(test.input_ids).long()
        logits = clf(input_ids=ids, attention_mask=ids != PAD_ID).logits
    assert logits.argmax(-1).tolist() == table[:, 3].tolist()
    acc = float(np.mean(table[:, 3] == table[:, 2]))
    assert res["runs"][0]["metrics"]["accuracy"] == pytest.approx(acc)
    with pytest.raises(InputError, match="exists and is not an empty folder"):
        fewshot(model, files["pool3"], files["test3"], shots=5, runs=1, config=TINY,
                save_model=saved)


@pytest.mark.slow
def test_mlflow_parent_linked_to_pretraining_with_artifacts(model, files, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out_json = tmp_path / "res" / "fewshot.json"
    res = fewshot(model, files["one_draw"], files["test2"], pool=files["pool2"], runs=2, seed=3,
                  tracking=Tracking(uri, "fs-test"), name="p/10", out_json=out_json)
    assert [r["seed"] for r in res["runs"]] == [3, 4]
    # 20 examples, batch 5, 20 epochs: the reference protocol's 80 optimizer steps per run.
    assert [r["steps"] for r in res["runs"]] == [80, 80]
    for name in ("accuracy", "f1", "mcc"):
        vals = [r["metrics"][name] for r in res["runs"]]
        assert res["mean"][name] == pytest.approx(np.mean(vals))
        assert res["std"][name] == pytest.approx(np.std(vals, ddof=1))
    assert json.loads(out_json.read_text())["mean"] == res["mean"]

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("fs-test")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.run_id == res["mlflow_run_id"] and parent.info.status == "FINISHED"
    assert parent.data.tags["cmgems.pretrain_run_id"] == "0123456789abcdef"
    assert parent.data.tags["cmgems.pretrain_mode"] == "cm_gems"
    assert parent.data.params["lr"] == "0.0001" and parent.data.params["epochs"] == "20"
    assert parent.data.params["shots"] == "10" and parent.data.params["pool_size"] == "100"
    assert parent.data.metrics["test_mean_mcc"] == pytest.approx(res["mean"]["mcc"])
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {
        "fewshot.json", "fewshot.predictions.tsv"}
    logged = Path(client.download_artifacts(parent.info.run_id, "fewshot.json", str(tmp_path)))
    assert json.loads(logged.read_text())["runs"][1]["train_rows"] == res["runs"][1]["train_rows"]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    by_seed = {c.data.params["seed"]: c for c in children}
    assert set(by_seed) == {"3", "4"} and by_seed["3"].data.params["train_rows"] == "20"
    assert by_seed["4"].data.metrics["test_accuracy"] == pytest.approx(
        res["runs"][1]["metrics"]["accuracy"])


def test_tracking_failure_does_not_stop_the_evaluation(model, files, tmp_path, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    tracking = Tracking(f"sqlite:///{blocker / 'mlflow.db'}")
    with caplog.at_level(logging.WARNING, logger="cmgems.finetune"):
        res = fewshot(model, files["one_draw"], files["test2"], runs=1, seed=0, config=TINY,
                      tracking=tracking)
    assert len(res["runs"]) == 1 and res["mlflow_run_id"] is None
    assert "MLflow tracking disabled" in caplog.text


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
    with pytest.raises(InputError, match="precision"):
        FinetuneConfig(precision="fp8")


def test_help_documents_every_option():
    from launchers.finetune import build_parser
    parser = build_parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings or action.dest} has no help"


# --------------------------------------------------------------------------- the CLI
def test_cli_bad_input_exits_2_and_writes_nothing(model, files, tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text(TSV_HEAD + '"AAAAAA AAAAAC"\t0\n"AAAAAA AAAAAT"\tpromoter\n')
    out = tmp_path / "out.json"
    common = ("--out", str(out), "--runs-root", str(tmp_path / "runs"))
    res = run_module("-m", "launchers.finetune", str(model), "--train", str(bad), "--test",
                     str(bad), *common, check=False, timeout=300)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("error: ") and "bad.tsv, line 3" in res.stderr
    # A pool short of n in some class: one line, exit 2, no traceback, nothing written.
    res = run_module("-m", "launchers.finetune", str(model), "--pool", str(files["pool2"]),
                     "--shots", "45", "--test", str(files["test2"]), *common, check=False,
                     timeout=300)
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and "class 1 has 40 examples, fewer than the 45" \
        in res.stderr
    assert not out.exists()


def test_cli_prints_progress_lines_and_the_final_table(model, files, tmp_path):
    """stderr is a pipe here, not a terminal: one plain line per run instead of a bar."""
    out = tmp_path / "r.json"
    res = run_module("-m", "launchers.finetune", str(model), "--train", str(files["pool3"]),
                     "--shots", "4", "--test", str(files["test3"]), "--runs", "2", "--epochs",
                     "1", "--max-length", "40", "--no-tracking", "--out", str(out),
                     "--name", "splice", timeout=300)
    runs = [line for line in res.stderr.splitlines() if line.startswith("splice: run ")]
    assert [line.split(" (")[0] for line in runs] == ["splice: run 1/2", "splice: run 2/2"]
    assert "accuracy" in runs[0] and "\r" not in res.stderr
    result = json.loads(out.read_text())
    assert res.stdout.splitlines()[0] == (
        f"splice: 2 run(s) (seeds {DEFAULT_SEED}-{DEFAULT_SEED + 1}); training: 4 per class drawn per run from a pool of 300 "
        f"(100, 100, 100 per class; {files['pool3']}); test: 30 examples ({files['test3']})")
    assert f"| accuracy % | {100 * result['mean']['accuracy']:.2f} ± " in res.stdout
    assert "| MCC | " in res.stdout


def test_cli_in_process_maps_options_and_writes_json(model, tmp_path, capsys):
    from launchers.finetune import main
    rng = np.random.default_rng(2)
    task = tmp_path / "task"
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
    assert "the whole training file in every run: 16 examples (8, 8 per class" \
        in capsys.readouterr().out


# --------------------------------------------------------------------------- optional, ../shared
def test_prom_core_ten_shot_runs_draw_from_the_thousand_shot_pool():
    """GeneMask's Prom-core 10/train.tsv is one draw (20 rows); drawn from its 1000-shot file,
    the runs differ in data, each 10 per class."""
    one = load_task_file(shared_file("fewshot/prom-core/10/train.tsv"), 6)
    pool = load_task_file(shared_file("fewshot/prom-core/1000/train.tsv"), 6)
    plan = shot_pool(pool.path, pool.labels, num_labels(pool), None, (one.path, one.labels))
    assert plan.shots == 10 and plan.size == 2000
    sets = [tuple(plan.rows(0, r)) for r in range(10)]
    assert len(set(sets)) == 10
    assert all(np.bincount(pool.labels[list(s)]).tolist() == [10, 10] for s in sets)
