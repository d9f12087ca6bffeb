"""Running a strategy comparison: pretrain each strategy, finetune each export, write the report.

Every strategy is pretrained with the same config, seed and data order, as a child process of
the pretraining launcher, into OUTPUT_DIR/<strategy> (with several seeds, once per seed into
OUTPUT_DIR/<strategy>-seed<S>); then each export is finetuned on every
few-shot task (cmgems.evaluation.finetune.fewshot). A re-run skips finished pretrainings and few-shot results
already computed with the same settings, and resumes an unfinished run from its last checkpoint.
MLflow: one parent run (reopened by a re-run) holding the report, one child per strategy (its
pretraining run, plus the few-shot metrics fewshot/<task>/<metric>_mean|_std), all in the store
that cmgems.tracking.uri.resolve_tracking_uri() gives (the one pretraining and finetuning from the
same working directory use); the pretraining children are handed it as MLFLOW_TRACKING_URI.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import time
from pathlib import Path

from cmgems.compare.config import (CompareConfig, FewshotTask, PretrainRun, split_strategy,
                                   strategy_label, strategy_mode,
                                   config_mismatch, parse_fewshot, unique_tasks)
from cmgems.pretrain.layout import RunLayout
from cmgems.pretrain.result import RunResult
from cmgems.compare.report import write_report
from cmgems.errors import InputError
from cmgems.evaluation.finetune import FinetuneConfig, fewshot
from cmgems.evaluation.metrics import mean_std
from cmgems.evaluation.shots import DRAW_RULE
from cmgems.pretrain.process import Interrupted, SignalForwarder, pretrain_command, run_logged
from cmgems.tracking.tracker import Tracker
from cmgems.tracking.uri import resolve_tracking_uri

EXIT_RUN_FAILED = 1
STATE_NAME = "compare_state.json"  # the parent run's id, for a re-run to continue it
# Pretraining options the comparison sets itself (per strategy or from its own options): passing
# them through would make the runs differ from what the table says.
MANAGED = {"--mode": "--strategies", "--output-dir": "--output-dir", "--run-name": "--name",
           "--parent-run-id": None, "--experiment": "--experiment", "--resume": None,
           "--config": "--config", "--data-dir": "--data-dir", "--max-steps": "--max-steps",
           "--model": "--model", "--seed": "--seed"}
# CompareConfig fields that are pretraining options of the same name, when set (the seed is each
# PretrainRun's own).
SHARED_PRETRAIN = ("data_dir", "max_steps", "model")


class RunFailed(Exception):
    """A pretraining child failed; the message names the strategy and its log file."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def check_passthrough(extra: list[str], strategies: list[str] = ()) -> None:
    lookups = [s for s in strategies if split_strategy(s)[1] is not None]
    for token in extra:
        flag = token.split("=", 1)[0]
        if flag == "--pmi-lookup" and lookups:
            raise InputError(f"pretraining option --pmi-lookup cannot be passed through: "
                             f"strategy {lookups[0]!r} sets its own")
        if flag in MANAGED:
            own = MANAGED[flag]
            hint = f"use compare.py's {own}" if own else "the comparison sets it itself"
            raise InputError(f"pretraining option {flag} cannot be passed through ({hint})")


def gpu_count(requested: int | None) -> int:
    if requested is not None:
        return requested
    import torch
    return torch.cuda.device_count()


def expected_fields(config: CompareConfig, run: PretrainRun) -> dict:
    """The pretraining config fields a run must have."""
    want = {"mode": strategy_mode(run.strategy)}
    lookup = split_strategy(run.strategy)[1]
    if lookup is not None:
        want["pmi_lookup"] = lookup
    for key in SHARED_PRETRAIN:
        if getattr(config, key) is not None:
            want[key] = getattr(config, key)
    if run.seed is not None:
        want["seed"] = run.seed
    return want


def pretrain_args(config: CompareConfig, run: PretrainRun, run_dir: Path, parent_run_id: str,
                  name: str, extra: list[str]) -> list[str]:
    args = ["--config", config.config] if config.config else []
    for key in SHARED_PRETRAIN:
        if getattr(config, key) is not None:
            args += ["--" + key.replace("_", "-"), str(getattr(config, key))]
    if run.seed is not None:
        args += ["--seed", str(run.seed)]
    lookup = split_strategy(run.strategy)[1]
    if lookup is not None:
        args += ["--pmi-lookup", lookup]
    # The passthrough goes before the managed options; check_passthrough refuses overlaps anyway.
    return args + extra + ["--mode", strategy_mode(run.strategy), "--output-dir", str(run_dir),
                           "--run-name", f"{name}-{run.label}", "--experiment", config.experiment,
                           "--parent-run-id", parent_run_id, "--resume"]


def run_pretraining(cmd: list[str], strategy: str, run_dir: Path, log_path: Path,
                    forwarder: SignalForwarder, tracking_uri: str) -> RunResult:
    """The finished run's result, or RunFailed with the log's last lines."""
    code = run_logged(cmd, log_path, forwarder, f"pretraining of strategy {strategy!r}",
                      env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri})
    result = RunResult.finished(run_dir) if code == 0 else None
    if result is None:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        why = f"exit {code}" if code else "it stopped before max_steps"
        raise RunFailed(f"pretraining of strategy {strategy!r} failed ({why}); full log: "
                        f"{log_path}\n--- last lines of the log ---\n" + "\n".join(tail),
                        code if code else EXIT_RUN_FAILED)
    return result


def fewshot_metrics(task: FewshotTask, summary: dict) -> dict[str, float]:
    out = {}
    for stat in ("mean", "std"):
        for metric, value in summary[stat].items():
            out[f"fewshot/{task.slug}/{metric}_{stat}"] = value
    return out


def cached_fewshot(path: Path, expected: dict) -> dict | None:
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    params = summary.get("params", {})
    return summary if all(params.get(k) == v for k, v in expected.items()) else None


def evaluate_strategy(config: CompareConfig, finetune: FinetuneConfig, strategy: str,
                      result: RunResult, tasks: list[FewshotTask],
                      parent: Tracker) -> dict[str, dict]:
    """Few-shot summaries of one strategy's export, per task name: reused from its folder when
    computed with the same settings, else computed and logged to the strategy's MLflow run."""
    model_dir = RunLayout(result.output_dir).export
    out: dict[str, dict] = {}
    for task in tasks:
        path = Path(result.output_dir) / "fewshot" / f"{task.slug}.json"
        # n inferred from the same file is the same n; a result of another draw rule (or of the
        # consecutive blocks read before it) is never reused.
        expected = {"model_dir": str(model_dir), "train": str(task.train), "test": str(task.test),
                    "runs": config.runs, "seed": config.fewshot_seed, "draw": DRAW_RULE,
                    **({"shots": config.shots} if config.shots is not None else {}),
                    **dataclasses.asdict(finetune)}
        summary = cached_fewshot(path, expected)
        if summary is not None:
            print(f"  {strategy} / {task.name}: few-shot results already in {path}, reused",
                  flush=True)
        else:
            t0 = time.time()
            summary = fewshot(model_dir, task.train, task.test, runs=config.runs,
                              seed=config.fewshot_seed, shots=config.shots, config=finetune,
                              tracking=None, name=f"{strategy}/{task.name}", out_json=path,
                              progress=True)
            if result.mlflow_run_id:
                child = Tracker(True, parent.tracking_uri, config.experiment,
                                run_id=result.mlflow_run_id)
                child.log_metrics(fewshot_metrics(task, summary), 0)
                child.log_artifact(path, "fewshot")
                child.log_artifact(summary["predictions"], "fewshot")
                child.finish("FINISHED")
            accuracy = mean_std(summary["mean"]["accuracy"], summary["std"]["accuracy"])
            print(f"  {strategy} / {task.name}: accuracy {accuracy} % over {config.runs} run(s), "
                  f"{summary['shots']} per class from a pool of {summary['pool']['size']} "
                  f"({time.time() - t0:.0f} s)", flush=True)
        out[task.name] = summary
    return out


def _or_blank(value) -> str:
    return "" if value is None else str(value)


def _params(config: CompareConfig, finetune: FinetuneConfig, strategies: list[str],
            tasks: list[FewshotTask], num_gpus: int, extra: list[str]) -> dict:
    """The parent run's MLflow params."""
    return {"strategies": ",".join(strategies), "config": config.config or "",
            "data_dir": config.data_dir or "", "max_steps": _or_blank(config.max_steps),
            "model": config.model or "", "seed": _or_blank(config.seed),
            "seeds": config.seeds or "", "num_gpus": num_gpus,
            "pretrain_args": shlex.join(extra),
            "fewshot": ";".join(f"{t.name}={t.train}:{t.test}" for t in tasks),
            "fewshot.runs": config.runs,
            "fewshot.shots": _or_blank(config.shots) or "inferred from each training file",
            "fewshot.seed": config.fewshot_seed, "fewshot.draw": DRAW_RULE,
            "finetune": dataclasses.asdict(finetune)}


def _pretrain_all(config, runs: list[PretrainRun], finished, out, parent, name, extra, num_gpus,
                  script, forwarder) -> dict[str, RunResult]:
    """Every run's finished result, by label: found in its folder, or pretrained now."""
    from cmgems.pretrain.checkpoint import latest_tag
    results: dict[str, RunResult] = {}
    for i, run in enumerate(runs, 1):
        s = run.label
        run_dir, log_path = out / s, out / "logs" / f"{s}.log"
        result = finished[s]
        if result is not None:
            print(f"[{i}/{len(runs)}] {s}: finished run found in {run_dir} "
                  f"(step {result.step}), skipping its pretraining", flush=True)
        else:
            cmd = pretrain_command(script, num_gpus, pretrain_args(
                config, run, run_dir, parent.run_id or "", name, extra))
            resumed = latest_tag(RunLayout(run_dir).checkpoints) is not None
            print(f"[{i}/{len(runs)}] {s}: "
                  + ("resuming the unfinished run from its last checkpoint" if resumed
                     else "pretraining") + f" (mode {strategy_label(run.strategy)}) -> "
                  f"{run_dir}; log {log_path}", flush=True)
            t0 = time.time()
            result = run_pretraining(cmd, s, run_dir, log_path, forwarder, parent.tracking_uri)
            ref, sw = result.final_ref_ppl(), result.switch_step
            print(f"[{i}/{len(runs)}] {s}: done in {time.time() - t0:.0f} s, step "
                  f"{result.step}, final ppl_ref {ref[1] if ref else float('nan'):.3f}"
                  + (f", switched {result.events[0]['from']} -> "
                     f"{result.events[0]['to']} at step {sw}" if sw is not None else ""),
                  flush=True)
        results[s] = result
    return results


def _summary_metrics(strategies, results, tasks, fewshot_results) -> dict[str, float]:
    metrics = {}
    for s in strategies:
        ref = results[s].final_ref_ppl()
        if ref:
            metrics[f"{s}/final_ppl_ref"] = ref[1]
        if results[s].switch_step is not None:
            metrics[f"{s}/switch_step"] = results[s].switch_step
        for masking, ppl in results[s].final_ppl_of().items():
            if ppl is not None:
                metrics[f"{s}/final_ppl/{masking}"] = ppl
        for task in tasks:
            metrics.update({f"{s}/{k}": v for k, v in
                            fewshot_metrics(task, fewshot_results[s][task.name]).items()})
    return metrics


def run_comparison(config: CompareConfig, finetune: FinetuneConfig, passthrough: list[str],
                   pretrain_script: str | Path) -> list[Path]:
    """The whole comparison (see the module doc); returns the report files written.

    passthrough: more pretraining options (after those of config.pretrain_args); pretrain_script:
    the pretraining launcher each strategy's child process runs. Raises InputError before
    anything is written for a bad command line or a finished run with other settings, RunFailed
    for a failed pretraining and Interrupted for a signal."""
    strategies = config.strategy_list
    runs = config.pretrain_runs
    labels = [r.label for r in runs]
    extra = shlex.split(config.pretrain_args) + list(passthrough)
    check_passthrough(extra, strategies)
    tasks = unique_tasks([parse_fewshot(s) for s in config.fewshot])
    num_gpus = gpu_count(config.num_gpus)
    out = Path(config.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    name = config.name or out.name

    finished = {r.label: RunResult.finished(out / r.label) for r in runs}
    for r in runs:
        s, result = r.label, finished[r.label]
        bad = result is not None and config_mismatch(out / s, expected_fields(config, r))
        if bad:
            raise InputError(f"{out / s}: holds a finished run with other settings ({bad}); "
                             f"use another --output-dir or delete that folder")

    parent = Tracker.reopen(out / STATE_NAME, resolve_tracking_uri(), config.experiment, name)
    seeds = config.seed_list
    print(f"comparison {name}: {len(strategies)} strategies ({', '.join(strategies)})"
          + (f" x {len(seeds)} seeds ({', '.join(map(str, seeds))})" if len(seeds) > 1 else "")
          + f", {len(tasks)} few-shot task(s); output {out}; MLflow {parent.tracking_uri} parent run "
          f"{parent.run_id}{' (reused)' if parent.reused else ''}", flush=True)
    parent.log_params(_params(config, finetune, strategies, tasks, num_gpus, extra))
    status = "FAILED"
    with SignalForwarder() as forwarder:
        try:
            results = _pretrain_all(config, runs, finished, out, parent, name, extra,
                                    num_gpus, pretrain_script, forwarder)
            fewshot_results: dict[str, dict[str, dict]] = {}
            if tasks:
                print("few-shot evaluation", flush=True)
                for s in labels:
                    fewshot_results[s] = evaluate_strategy(config, finetune, s, results[s],
                                                           tasks, parent)
            paths = write_report(out, runs, results, tasks, fewshot_results, name)
            parent.log_metrics(_summary_metrics(labels, results, tasks, fewshot_results), 0)
            for p in paths:
                parent.log_artifact(p)
            status = "FINISHED"
        except (Interrupted, KeyboardInterrupt):
            status = "KILLED"
            raise
        finally:
            parent.finish(status)
    print((out / "comparison.md").read_text())
    print("wrote " + ", ".join(str(p) for p in paths), flush=True)
    return paths
