"""MLflow as its users use it, on a real SQLite store: where runs go, URIs refused before anything
starts, deleted experiments and runs, source tags, dataset inputs, system metrics, logged and
registered transformers models, a moved runs folder; and one real pretraining that logs them."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import ROOT, run_module
from cmgems.pretrain.config import PretrainConfig
from cmgems.errors import InputError
from cmgems.tracking.tracker import Tracker
from cmgems.tracking.uri import check_tracking_uri, relocate_artifacts, resolve_tracking_uri


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    """One store for the module (making one costs seconds); each test its own experiment."""
    return resolve_tracking_uri(tmp_path_factory.mktemp("store") / "runs")


@pytest.fixture
def exp(request) -> str:
    return request.node.name


# ---------------------------------------------------------------------- where runs go
def test_one_store_per_runs_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert resolve_tracking_uri("elsewhere") == f"sqlite:///{tmp_path / 'elsewhere' / 'mlflow.db'}"
    assert resolve_tracking_uri(uri="sqlite:///x.db") == "sqlite:///x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri() == "http://127.0.0.1:5000"


@pytest.mark.parametrize("uri", ["sqlite:///runs/mlflow.db", "http://host:5000", "https://h",
                                 "postgresql+psycopg2://u@h/db", "databricks"])
def test_known_uris_pass(uri):
    assert check_tracking_uri(uri) == uri


@pytest.mark.parametrize("uri, message", [
    ("foo://bar", "unknown scheme 'foo'"),
    ("htp://host:5000", "unknown scheme 'htp'"),
    ("./mlruns", "a file store, which MLflow 3 refuses"),
    ("file:///tmp/mlruns", "a file store"),
])
def test_unusable_uris_are_refused(uri, message, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(InputError, match=message):
        check_tracking_uri(uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(InputError, match=f"MLFLOW_TRACKING_URI '{uri}': {message}"):
        PretrainConfig()
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(InputError, match=f"tracking_uri '{uri}'"):
        PretrainConfig(tracking_uri=uri)


@pytest.mark.slow
def test_unknown_scheme_stops_pretraining_before_it_starts(tmp_path):
    out = tmp_path / "run"
    res = run_module("-m", "launchers.pretrain", "--output-dir", str(out), "--max-steps", "1",
                     env={"MLFLOW_TRACKING_URI": "htp://localhost:5000"}, check=False,
                     timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "unknown scheme 'htp'" in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()


# ---------------------------------------------------------------------- runs
def test_deleted_experiment_is_restored_and_logged_into(uri, exp, caplog):
    client = MlflowClient(uri)
    first = Tracker(True, uri, exp, "first")
    first.finish()
    client.delete_experiment(client.get_experiment_by_name(exp).experiment_id)
    with caplog.at_level(logging.WARNING, logger="cmgems.tracking"):
        tracker = Tracker(True, uri, exp, "second")
    assert "had been deleted; restored it" in caplog.text
    tracker.log_metrics({"loss": 1.5}, step=1)
    tracker.finish()
    assert tracker.summary()["metrics_sent"] == 1 and tracker.summary()["metrics_pending"] == 0
    assert client.get_experiment_by_name(exp).lifecycle_stage == "active"
    assert client.get_metric_history(tracker.run_id, "loss")[0].value == 1.5


def test_deleted_run_is_restored_on_resume(uri, exp, caplog):
    client = MlflowClient(uri)
    run_id = Tracker(True, uri, exp, "r").run_id
    client.delete_run(run_id)
    with caplog.at_level(logging.WARNING, logger="cmgems.tracking"):
        tracker = Tracker(True, uri, exp, "r", run_id=run_id)
    assert "run %s" % run_id in caplog.text and "restored" in caplog.text
    tracker.log_metrics({"loss": 2.0}, step=3)
    tracker.finish()
    assert tracker.summary()["metrics_sent"] == 1
    assert client.get_run(run_id).info.lifecycle_stage == "active"


def test_runs_carry_source_and_git_tags(uri, exp):
    tracker = Tracker(True, uri, exp, "r")
    tags = MlflowClient(tracker.tracking_uri).get_run(tracker.run_id).data.tags
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"]
    assert tags["mlflow.user"]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True)
    if head.returncode != 0:
        pytest.skip(reason="the checkout under test is not a git repository")
    assert tags["mlflow.source.git.commit"] == head.stdout.strip()


def test_dataset_input(uri, exp, tmp_path):
    tracker = Tracker(True, uri, exp, "r")
    profile = {"genome": "lambda.fa.gz", "genome_sha256": "a" * 64, "train_samples": 114}
    tracker.log_dataset("lambda", "0123456789abcdef", tmp_path, profile)
    run = MlflowClient(tracker.tracking_uri).get_run(tracker.run_id)
    (given,) = run.inputs.dataset_inputs
    assert given.dataset.name == "lambda" and given.dataset.digest == "0123456789abcdef"
    assert json.loads(given.dataset.profile) == profile
    assert json.loads(given.dataset.source)["uri"] == str(tmp_path.resolve())
    assert [(t.key, t.value) for t in given.tags] == [("mlflow.data.context", "training")]


def test_system_metrics(uri, exp, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    tracker = Tracker(True, uri, exp, "r")
    tracker.start_system_metrics()
    time.sleep(2.5)
    tracker.finish()
    metrics = MlflowClient(tracker.tracking_uri).get_run(tracker.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics
    assert "system/system_memory_usage_megabytes" in metrics


def test_disabled_tracker_does_nothing(tmp_path):
    off = Tracker(False)
    off.start_system_metrics()
    off.log_dataset("d", "0", tmp_path, {})
    assert off.log_hf_model(tmp_path) is None
    off.finish()
    assert off.summary()["failed_calls"] == 0


def test_model_logging_never_raises(uri, exp, tmp_path):
    down = Tracker(True, "http://127.0.0.1:9", exp, "r")  # nothing listens on port 9
    assert down.log_hf_model(tmp_path) is None
    broken = Tracker(True, uri, exp, "r")
    assert broken.log_hf_model(tmp_path / "no-such-export") is None
    assert broken.summary()["failed_calls"] == 1


def test_moved_runs_folder_finds_its_artifacts(tmp_path):
    old = tmp_path / "a" / "runs"
    tracker = Tracker(True, resolve_tracking_uri(old), "exp", "r")
    (tmp_path / "note.txt").write_text("hello")
    tracker.log_artifact(tmp_path / "note.txt")
    tracker.finish()
    new = tmp_path / "b" / "runs"
    new.parent.mkdir()
    shutil.move(old, new)
    assert relocate_artifacts(new / "mlflow.db") == 2  # the experiment's and the run's
    uri = resolve_tracking_uri(new)
    client = MlflowClient(uri)
    path = client.download_artifacts(tracker.run_id, "note.txt", str(tmp_path))
    assert open(path).read() == "hello"
    assert client.get_run(tracker.run_id).info.artifact_uri.startswith((new / "mlartifacts")
                                                                       .as_uri())
    assert relocate_artifacts(new / "mlflow.db") == 0  # nothing left to move


# ---------------------------------------------------------------------- models
@pytest.mark.slow
def test_export_is_logged_and_registered_as_a_transformers_model(uri, exp, tmp_path):
    import mlflow.transformers
    from transformers import BertConfig, BertForMaskedLM

    from cmgems.model.architectures import export
    from cmgems.data.tokens import PAD_ID, vocab_size
    config = BertConfig(vocab_size=vocab_size(6), hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                        pad_token_id=PAD_ID)
    torch.manual_seed(0)
    model_dir = export(BertForMaskedLM(config).state_dict(), config, tmp_path / "export")
    tracker = Tracker(True, uri, exp, "r")
    model_uri = tracker.log_hf_model(model_dir, registered_model_name="tiny-dna", step=8)
    tracker.finish()
    assert model_uri and model_uri.startswith("models:/")
    client = MlflowClient(uri)
    (version,) = client.search_model_versions("name='tiny-dna'")
    assert version.run_id == tracker.run_id and version.source == model_uri
    (output,) = client.get_run(tracker.run_id).outputs.model_outputs
    assert output.step == 8
    mlflow.set_tracking_uri(uri)
    try:
        fill = mlflow.transformers.load_model(model_uri)
    finally:
        mlflow.set_tracking_uri(None)
    guesses = fill("acgtacgtac[MASK]ACGTACGT", top_k=2)
    assert len(guesses) == 2 and all(len(g["token_str"]) == 6 for g in guesses)
    with pytest.raises(ValueError, match="not a nucleotide"):
        fill("ACGTXACGT[MASK]ACGTACGT")


@pytest.mark.slow
def test_pretraining_logs_dataset_model_tags_and_links_the_export(tiny_dataset, tmp_path):
    out = tmp_path / "runs" / "r"
    run_module("-m", "launchers.pretrain", "--data-dir", str(tiny_dataset), "--output-dir",
               str(out), "--max-steps", "4", "--micro-batch-size", "4", "--grad-accum", "1",
               "--max-length", "64", "--eval-interval", "2", "--eval-batches", "1",
               "--log-interval", "2", "--num-workers", "0", "--threshold", "1e9",
               "--warmup-steps", "1", "--register-model", "lambda-logo",
               "--license", "apache-2.0",
               env={"MLFLOW_TRACKING_URI": "",
                    "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"})
    result = json.loads((out / "result.json").read_text())
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run = client.get_run(result["mlflow_run_id"])
    manifest = json.loads((tiny_dataset / "manifest.json").read_text())
    (given,) = run.inputs.dataset_inputs
    profile = json.loads(given.dataset.profile)
    assert profile["genome_sha256"] == manifest["source"]["sha256"]
    assert profile["train_samples"] == sum(s["samples"] for s in manifest["shards"]
                                           if s["split"] == "train")
    assert run.data.tags["mlflow.source.name"].endswith("pretrain.py")
    (version,) = client.search_model_versions("name='lambda-logo'")
    assert version.run_id == run.info.run_id and run.data.tags["model_uri"] == version.source
    info = json.loads((out / "export" / "cmgems.json").read_text())
    assert info["mlflow_run_id"] == run.info.run_id and info["curriculum"]["switch_step"] == 4
    card = (out / "export" / "README.md").read_text()
    assert manifest["source"]["sha256"] in card and "at step 4" in card
    # the registry version is described by the card's summary; the card carries the license
    from huggingface_hub import ModelCard
    from cmgems.model.card import summary
    assert version.description == summary(info) and "pretrained with cmgems for 4 steps" in \
        version.description
    assert ModelCard.load(out / "export" / "README.md").data.license == "apache-2.0"
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert {"export/README.md", "export/cmgems.json"} <= {
        a.path for a in client.list_artifacts(run.info.run_id, "export")}
