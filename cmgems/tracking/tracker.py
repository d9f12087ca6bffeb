"""MLflow logging from rank 0 that never stops training.

Metrics go to a buffer and are sent in batches; if the store is unreachable the batch stays buffered
and is retried at the next flush (up to `max_buffered` values, beyond which the oldest are dropped
and counted as lost). Every other call (params, tags, artifacts) is tried once and, on failure,
counted and warned about. `summary()` says what was sent, retried and lost.

Pretraining, finetuning and the strategy comparison all log through Tracker. `child()` nests a run
under this one (a finetuning task's seeds), `parent_run_id` under a run of another process (a
comparison's pretrainings), and `reopen()` continues the run that an earlier invocation of the same
command started (the comparison's parent run).

Runs carry the tags MLflow's own start_run sets (user, source, git commit); `log_dataset` records a
dataset input, `log_hf_model` an export as a transformers-flavour model (optionally registered),
`start_system_metrics` MLflow's system/* monitor. A deleted experiment or run is restored, with a
warning, rather than silently logging nothing.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from cmgems.io import atomic_path
from cmgems.tracking.uri import artifact_root

# A dead server must cost seconds, not MLflow's default minutes of retries with backoff.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")

log = logging.getLogger("cmgems.tracking")


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def source_tags() -> dict[str, str]:
    """The tags MLflow's own start_run would set (mlflow.user, mlflow.source.name and .type,
    mlflow.source.git.commit when the entry point lies in a git checkout); a console script
    outside any checkout gets the commit of the cmgems checkout running, if it is one."""
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils.git_utils import get_git_commit
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

    tags = resolve_tags()
    if MLFLOW_GIT_COMMIT not in tags:
        commit = get_git_commit(str(Path(__file__).resolve().parent))
        if commit:
            tags[MLFLOW_GIT_COMMIT] = commit
    return tags



def library_versions() -> dict[str, str]:
    """The versions a run's numbers depend on."""
    import deepspeed
    import mlflow
    import torch
    import transformers
    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__, "mlflow": mlflow.__version__,
            "python": sys.version.split()[0]}

class Tracker:
    """One MLflow run; `enabled=False` (ranks other than 0) makes every call a no-op."""

    def __init__(self, enabled: bool, tracking_uri: str = "", experiment: str = "cmgems",
                 run_name: str = "", run_id: str | None = None, max_buffered: int = 1_000_000,
                 parent_run_id: str = ""):
        self.enabled = enabled
        self.run_id = run_id
        self.experiment, self.run_name = experiment, run_name
        self.parent_run_id = parent_run_id
        self.pending: deque = deque()
        self.max_buffered = max_buffered
        self.sent = self.lost = self.failed_calls = 0
        self.retried = 0       # metrics sent after at least one failed attempt
        self._deferred = 0     # pending metrics (the oldest) that already failed once
        self.started_late = False
        self.logged_until: dict[str, int] | None = {}  # on resume: steps in the store, per key
        self._down_since: float | None = None
        self._client = None
        self.tracking_uri = tracking_uri
        self.reused = False  # reopen(): the run of an earlier invocation was continued
        self._system_metrics = None  # MLflow's monitor, once started
        if not enabled:
            return
        try:
            if run_id is None:
                self._create_run()
            else:
                self._reopen_run(run_id)
        except Exception as e:  # noqa: BLE001 - any store failure must not stop training
            self._failed("start the run", e)

    @property
    def client(self):
        """The MlflowClient, made on first use: making one can fail too (a SQLite path that
        cannot be created), and that must not stop a run either."""
        if self._client is None:
            from mlflow.tracking import MlflowClient
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def child(self, run_name: str) -> Tracker:
        """A run nested under this one, in the same store and experiment; a no-op when this run
        does not exist (tracking off, or the store was down when it should have started)."""
        return Tracker(self.enabled and self.run_id is not None, self.tracking_uri,
                       self.experiment, run_name, max_buffered=self.max_buffered,
                       parent_run_id=self.run_id or "")

    @classmethod
    def reopen(cls, state_path: str | Path, tracking_uri: str, experiment: str,
               run_name: str) -> Tracker:
        """The run whose id state_path keeps, while that store still holds it (`reused` is then
        True), else a new one; the id is (re)written to state_path so the next invocation of the
        same command continues this run."""
        state_path = Path(state_path)
        old = _kept_run_id(state_path, tracking_uri)
        tracker = cls(True, tracking_uri, experiment, run_name, run_id=old)
        tracker.reused = old is not None
        if tracker.run_id:
            with atomic_path(state_path) as tmp:
                tmp.write_text(json.dumps({"parent_run_id": tracker.run_id,
                                           "tracking_uri": tracking_uri}, indent=2) + "\n")
        return tracker

    def _create_run(self) -> None:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            exp_id = self.client.create_experiment(
                self.experiment, artifact_location=artifact_root(self.tracking_uri))
        else:
            exp_id = exp.experiment_id
            if exp.lifecycle_stage == "deleted":
                # MLflow refuses runs in a deleted experiment: the run would log nothing at all.
                self.client.restore_experiment(exp_id)
                log.warning("MLflow: experiment %r (id %s) in %s had been deleted; restored it "
                            "to log this run (delete it again afterwards, or choose another "
                            "experiment name)", self.experiment, exp_id, self.tracking_uri)
        tags = source_tags()
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        self.run_id = self.client.create_run(exp_id, run_name=self.run_name,
                                             tags=tags).info.run_id

    def _reopen_run(self, run_id: str) -> None:
        if self.client.get_run(run_id).info.lifecycle_stage == "deleted":
            self.client.restore_run(run_id)
            log.warning("MLflow: run %s in %s had been deleted; restored it to continue logging "
                        "into it", run_id, self.tracking_uri)
        self.client.update_run(run_id, status="RUNNING")

    def _failed(self, what: str, err: Exception) -> None:
        self.failed_calls += 1
        if self._down_since is None:
            self._down_since = time.time()
            log.warning("MLflow: could not %s (%s: %s); training goes on, metrics are buffered "
                        "and retried", what, type(err).__name__, str(err)[:200])

    def _call(self, what: str, fn, *args, **kw) -> bool:
        if not self.enabled or self.run_id is None:
            return False
        try:
            fn(*args, **kw)
            if self._down_since is not None:
                log.warning("MLflow: reachable again after %.0f s", time.time() - self._down_since)
                self._down_since = None
            return True
        except Exception as e:  # noqa: BLE001
            self._failed(what, e)
            return False

    def ensure_run(self) -> bool:
        """Create the run late if the store was down at start-up (called by every flush); the
        buffered metrics then go to it. Params, tags and artifacts of the outage stay lost."""
        if not self.enabled or self.run_id is not None:
            return self.enabled
        try:
            self._create_run()
        except Exception as e:  # noqa: BLE001
            self._failed("start the run", e)
            return False
        self.started_late = True
        log.warning("MLflow: run %s created late, after the store came back", self.run_id)
        self._down_since = None
        return True

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        for k, v in metrics.items():
            self.pending.append(Metric(k, float(v), now, step))
        while len(self.pending) > self.max_buffered:
            self.pending.popleft()
            self.lost += 1
            self._deferred = max(0, self._deferred - 1)

    def flush(self) -> None:
        if not self.enabled or not self.pending or not self.ensure_run():
            return
        if self.logged_until is None:  # the resumed run's history could not be read yet
            self.skip_logged_steps()
            if self.logged_until is None:
                self._deferred = len(self.pending)
                return
        if self.logged_until:
            # steps a resumed run recomputed after its checkpoint are in the store already
            kept = deque(m for m in self.pending if m.step > self.logged_until.get(m.key, -1))
            self._deferred = max(0, self._deferred - (len(self.pending) - len(kept)))
            self.pending = kept
        batch = list(self.pending)
        for i in range(0, len(batch), 1000):  # MLflow's log_batch limit
            chunk = batch[i:i + 1000]
            if not self._call("log metrics",
                              lambda: self.client.log_batch(self.run_id, metrics=chunk)):
                self._deferred = len(self.pending)  # stays pending, retried at the next flush
                return
            for _ in chunk:
                self.pending.popleft()
            self.sent += len(chunk)
            again = min(len(chunk), self._deferred)
            self.retried += again
            self._deferred -= again

    def skip_logged_steps(self) -> None:
        """A resumed run recomputes, bit for bit, the steps between its checkpoint and the crash;
        those already in the store are not logged twice. If the store cannot be read now, metrics
        wait in the buffer until it can (flush retries the read)."""
        if not self.enabled or self.run_id is None:
            return
        found: dict[str, int] = {}

        def read():
            run = self.client.get_run(self.run_id)
            for key in run.data.metrics:
                hist = self.client.get_metric_history(self.run_id, key)
                found[key] = max((m.step for m in hist), default=-1)
        self.logged_until = found if self._call("read the run's metric history", read) else None

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param
        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self._call("log params",
                       lambda: self.client.log_batch(self.run_id, params=items[i:i + 100]))

    def log_run_start(self, params: dict[str, Any], output_dir: Path, dataset: dict,
                      artifacts=()) -> None:
        """What a new training run records once: its parameters with the versions of the
        libraries it ran on, where its output is, its dataset input (`dataset`: a
        cmgems.model.card.dataset_summary) and the files it started from."""
        self.log_params({**params, "versions": library_versions()})
        self.set_tag("output_dir", str(Path(output_dir).resolve()))
        self.log_dataset(dataset["name"], dataset["manifest_checksum"][:16], dataset["path"],
                         dataset)
        for path in artifacts:
            self.log_artifact(path)

    def set_tag(self, key: str, value: Any) -> None:
        self._call(f"set tag {key}", lambda: self.client.set_tag(self.run_id, key, str(value)))

    def log_dataset(self, name: str, digest: str, source: str | Path, profile: dict,
                    context: str = "training") -> None:
        """A dataset input of the run (MLflow's log_input): where it is, its digest and a profile
        of figures; the data itself stays where it is."""
        def log():
            from mlflow.entities import Dataset, DatasetInput, InputTag
            from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

            # a "local" source, as MLflow's LocalArtifactDatasetSource writes it
            where = json.dumps({"uri": str(Path(source).resolve())})
            dataset = Dataset(name=name, digest=digest, source_type="local", source=where,
                              profile=json.dumps(profile))
            self.client.log_inputs(self.run_id, datasets=[DatasetInput(
                dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])])
        self._call(f"log dataset {name}", log)

    def log_hf_model(self, model_dir: str | Path, name: str = "model",
                     registered_model_name: str = "", step: int = 0,
                     description: str = "") -> str | None:
        """An exported masked language model (with its tokenizer, custom code included) as an
        MLflow model of the transformers flavour (a fill-mask pipeline), registered under
        `registered_model_name` if given, the registry version described by `description`; its
        URI, or None when it could not be logged (warned about, training goes on)."""
        logged: list = []

        def log():
            logged.append(_log_transformers_model(self, Path(model_dir), name,
                                                  registered_model_name or None, step,
                                                  description))
        self._call(f"log the model in {model_dir}", log)
        return logged[0] if logged else None

    def start_system_metrics(self, resume: bool = False) -> None:
        """MLflow's monitor of CPU, memory, disk, network (and GPU) use, as system/* metrics,
        every MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (10 by default); needs psutil.
        It runs in a thread of its own and stops by itself if the store goes away."""
        import importlib.util
        if not self.enabled or self.run_id is None or self._system_metrics is not None:
            return
        if importlib.util.find_spec("psutil") is None:
            log.info("MLflow: no system metrics (psutil is not installed)")
            return

        def start():
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
            # its start/stop notices are no news in a run's log; its warnings still show
            logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
            monitor = SystemMetricsMonitor(self.run_id, tracking_uri=self.tracking_uri,
                                           resume_logging=resume)
            monitor.start()
            self._system_metrics = monitor
        self._call("start system metrics", start)

    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None:
        if Path(path).exists():
            self._call(f"log artifact {path}",
                       lambda: self.client.log_artifact(self.run_id, str(path), subdir))

    def finish(self, status: str = "FINISHED") -> None:
        if self._system_metrics is not None:
            monitor, self._system_metrics = self._system_metrics, None
            self._call("stop system metrics", monitor.finish)
        self.flush()
        self._call("end the run", lambda: self.client.set_terminated(self.run_id, status))

    def summary(self) -> dict:
        """metrics_pending after finish(): values never sent (the store was down at the end)."""
        return {"metrics_sent": self.sent, "metrics_retried": self.retried,
                "metrics_pending": len(self.pending), "metrics_lost": self.lost,
                "failed_calls": self.failed_calls, "run_started_late": self.started_late}


def _kept_run_id(state_path: Path, tracking_uri: str) -> str | None:
    """The run id state_path keeps for this store, if the store still holds that run."""
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or state.get("tracking_uri") != tracking_uri:
        return None  # another store: a fresh run there
    try:
        from mlflow.tracking import MlflowClient
        MlflowClient(tracking_uri).get_run(state["parent_run_id"])
    except Exception:  # noqa: BLE001 - deleted, unknown or unreadable: a fresh run
        return None
    return state["parent_run_id"]


def _log_transformers_model(tracker: Tracker, model_dir: Path, name: str,
                            registered: str | None, step: int, description: str = "") -> str:
    import mlflow.transformers
    import numpy
    import torch
    import transformers
    from huggingface_hub import ModelCard
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    card = model_dir / "README.md"
    experiment_id = tracker.client.get_run(tracker.run_id).info.experiment_id
    with _fluent_store(tracker.tracking_uri, experiment_id):
        info = mlflow.transformers.log_model(
            {"model": AutoModelForMaskedLM.from_pretrained(model_dir),
             "tokenizer": AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)},
            name=name, task="fill-mask", run_id=tracker.run_id, step=step,
            registered_model_name=registered,
            # a card of our own (empty if need be) keeps MLflow from looking the model up on
            # the Hugging Face Hub, and from warning that the Hub has no license for it
            model_card=ModelCard(card.read_text() if card.is_file()
                                 else "---\nlibrary_name: transformers\n---\n"),
            # given, not inferred: inference loads the model again in a subprocess
            pip_requirements=[f"transformers=={transformers.__version__}",
                              f"torch=={torch.__version__.split('+')[0]}",
                              f"numpy=={numpy.__version__}"])
    version = getattr(info, "registered_model_version", None)
    if registered and version is not None and description:
        tracker.client.update_model_version(registered, str(version), description=description)
    return info.model_uri


@contextlib.contextmanager
def _fluent_store(tracking_uri: str, experiment_id: str):
    """mlflow.transformers logs through MLflow's fluent API, which takes the store and the
    experiment from process-wide settings (and sets MLFLOW_TRACKING_URI for subprocesses): set
    them for the call, then put back what was there, so no later store lookup of this process
    (resolve_tracking_uri reads that variable) goes astray."""
    import mlflow
    env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")}
    before = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(tracking_uri)
    os.environ["MLFLOW_EXPERIMENT_ID"] = experiment_id
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # None: unset again
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
