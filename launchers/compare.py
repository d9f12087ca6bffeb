"""Compare masking strategies in one command: pretrain each, then evaluate each.

    python launchers/compare.py --output-dir runs/compare --max-steps 300 \\
        --fewshot prom-core/10=/path/prom-core/10/train.tsv:/path/prom-core/test.tsv --runs 2
    python launchers/compare.py --output-dir runs/grch38-cmp --config launchers/configs/reference.yaml \\
        --data-dir data/grch38 --model dnabert --num-gpus 8 --fewshot /path/prom-core/10 \\
        -- --zero-stage 2 --micro-batch-size 25

Every strategy (default: random, genemask, global, cm_step, cm_gems) is pretrained with the same
config, seed and data order as a subprocess of launchers/pretrain.py (under `deepspeed --num_gpus N`
when GPUs are used, else plain python), into OUTPUT_DIR/<strategy>. Then each export is finetuned on
every --fewshot task (mean and std over --runs seeded runs). Written to OUTPUT_DIR: comparison.md
(strategy x task table, final reference perplexity, switch step), ref_perplexity.png,
fewshot_accuracy.png, comparison.json, logs/<strategy>.log. MLflow: one parent run (OUTPUT_DIR's
name) holding the report as artifacts, one child run per strategy (its pretraining run, plus the
few-shot metrics fewshot/<task>/<metric>_mean|_std).

Re-running with the same --output-dir skips strategies whose pretraining finished and few-shot
results already computed with the same settings; an unfinished run is resumed from its last
checkpoint. A failed pretraining run stops the comparison, naming the strategy and its log file.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable from a checkout, uninstalled

from cmgems.compare import (DEFAULT_STRATEGIES, STRATEGY_MODES, FewshotTask,  # noqa: E402
                            config_mismatch, final_ref_ppl, fewshot_plot, finished_result,
                            markdown_table, parse_fewshot, parse_strategies, ref_ppl_plot,
                            switch_step, unique_tasks)
from cmgems.errors import EXIT_INPUT_ERROR, InputError  # noqa: E402
from cmgems.io import atomic_path  # noqa: E402

PRETRAIN = ROOT / "launchers" / "pretrain.py"
EXIT_RUN_FAILED = 1
STATE_NAME = "compare_state.json"
# Pretraining options the comparison sets itself (per strategy or from its own options): passing
# them through would make the runs differ from what the table says.
MANAGED = {"--mode": "--strategies", "--output-dir": "--output-dir", "--run-name": "--name",
           "--parent-run-id": None, "--experiment": "--experiment", "--resume": None,
           "--config": "--config", "--data-dir": "--data-dir", "--max-steps": "--max-steps",
           "--model": "--model", "--seed": "--seed"}


class RunFailed(Exception):
    """A pretraining subprocess failed; the message names the strategy and its log file."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compare.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to compare")
    g.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES),
                   help="comma-separated strategies, each pretrained once: "
                        f"{', '.join(f'{k} (mode {v})' for k, v in STRATEGY_MODES.items())} "
                        "(default: %(default)s)")
    g.add_argument("--output-dir", default="runs/compare",
                   help="comparison folder: one run folder per strategy, logs, report, and the "
                        "default MLflow store OUTPUT_DIR/mlflow.db; reuse it to skip finished "
                        "runs (default: %(default)s)")
    g.add_argument("--name", default=None,
                   help="MLflow parent run name; children are NAME-<strategy> (default: the "
                        "output folder's name)")
    g.add_argument("--experiment", default="cmgems-compare",
                   help="MLflow experiment of the parent and child runs (default: %(default)s); "
                        "MLFLOW_TRACKING_URI selects a server instead of OUTPUT_DIR/mlflow.db")
    pre = p.add_argument_group("pretraining (the same for every strategy)")
    pre.add_argument("--config", default=None,
                     help="pretraining config file, YAML or JSON (default: launchers/pretrain.py's, "
                          "launchers/configs/quick.yaml)")
    pre.add_argument("--data-dir", default=None,
                     help="dataset folder (manifest.json + shards); built from the config's genome "
                          "on first use when empty (default: the config's)")
    pre.add_argument("--max-steps", type=int, default=None,
                     help="step budget of every run (default: the config's)")
    pre.add_argument("--model", choices=("logo", "dnabert"), default=None,
                     help="model size: logo (2 layers) or dnabert (BERT-base) (default: the config's)")
    pre.add_argument("--seed", type=int, default=None,
                     help="seed of every run: same init, data order and masking randomness "
                          "(default: the config's)")
    pre.add_argument("--num-gpus", type=int, default=None,
                     help="GPUs per run: > 0 launches `deepspeed --num_gpus N`, 0 plain python on "
                          "CPU (default: every visible GPU, 0 when there is none)")
    pre.add_argument("--pretrain-args", default="",
                     help="more launchers/pretrain.py options for every run, one quoted string, "
                          "e.g. \"--max-length 128 --eval-interval 25\"; anything after a bare "
                          "`--` is passed on too")
    few = p.add_argument_group("few-shot evaluation of each export (cmgems.finetune.fewshot)")
    few.add_argument("--fewshot", action="append", default=[], metavar="SPEC",
                     help="a task, repeatable: NAME=TRAIN:TEST, TRAIN:TEST, NAME=FOLDER or FOLDER "
                          "(a folder holding train.tsv/.csv, with test.tsv/.csv in it or in its "
                          "parent, e.g. fewshot/prom-core/10); none: perplexity only")
    few.add_argument("--runs", type=int, default=10,
                     help="seeded finetuning runs per task, reported as mean ± std "
                          "(default: %(default)s, GeneMask's protocol)")
    few.add_argument("--shots", type=int, default=None,
                     help="examples per class per run: the training file is read as blocks of "
                          "SHOTS per class, run r uses block r mod blocks (default: whole file)")
    few.add_argument("--fewshot-seed", type=int, default=0,
                     help="seed of the first finetuning run; run r uses seed+r (default: %(default)s)")
    few.add_argument("--finetune-epochs", type=int, default=20, help="epochs (default: %(default)s)")
    few.add_argument("--finetune-lr", type=float, default=1e-4,
                     help="peak learning rate (default: %(default)s)")
    few.add_argument("--finetune-batch-size", type=int, default=5,
                     help="examples per batch (default: %(default)s)")
    few.add_argument("--finetune-device", default="auto",
                     help="'auto' (cuda when available), 'cpu', 'cuda:N' (default: %(default)s)")
    return p


def split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def check_passthrough(extra: list[str]) -> None:
    for token in extra:
        flag = token.split("=", 1)[0]
        if flag in MANAGED:
            own = MANAGED[flag]
            hint = f"use compare.py's {own}" if own else "the comparison sets it itself"
            raise InputError(f"pretraining option {flag} cannot be passed through ({hint})")


def gpu_count(requested: int | None) -> int:
    if requested is not None:
        if requested < 0:
            raise InputError(f"--num-gpus must be >= 0, got {requested}")
        return requested
    import torch
    return torch.cuda.device_count()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain_command(args, strategy: str, run_dir: Path, parent_run_id: str, name: str,
                     extra: list[str], num_gpus: int) -> list[str]:
    if num_gpus > 0:
        launcher = Path(sys.executable).parent / "deepspeed"
        head = [str(launcher) if launcher.exists() else "deepspeed", "--num_gpus", str(num_gpus),
                "--master_port", str(_free_port()), str(PRETRAIN)]
    else:
        head = [sys.executable, str(PRETRAIN)]
    cmd = head + (["--config", args.config] if args.config else [])
    for flag, value in (("--data-dir", args.data_dir), ("--max-steps", args.max_steps),
                        ("--model", args.model), ("--seed", args.seed)):
        if value is not None:
            cmd += [flag, str(value)]
    # The passthrough goes before the managed options; check_passthrough refuses overlaps anyway.
    return cmd + extra + ["--mode", STRATEGY_MODES[strategy], "--output-dir", str(run_dir),
                          "--run-name", f"{name}-{strategy}", "--experiment", args.experiment,
                          "--parent-run-id", parent_run_id, "--resume"]


def expected_fields(args, strategy: str) -> dict:
    want = {"mode": STRATEGY_MODES[strategy]}
    for key in ("data_dir", "max_steps", "model", "seed"):
        if getattr(args, key) is not None:
            want[key] = getattr(args, key)
    return want


class Interrupted(Exception):
    """SIGTERM/SIGUSR1 (a kill, Slurm preemption or time limit) reached the comparison."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class SignalForwarder:
    """Passes SIGTERM/SIGUSR1 on to the running pretraining, which checkpoints and exits cleanly
    (a re-run resumes it); between runs the signal stops the comparison at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.child: subprocess.Popen | None = None
        self.received: int | None = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.received = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)
        else:
            raise Interrupted(f"{signal.Signals(signum).name} received between runs; re-run the "
                              f"same command to continue", signum)


def run_pretraining(cmd: list[str], strategy: str, log_path: Path,
                    forwarder: SignalForwarder) -> dict:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "a") as log:
        log.write(f"\n$ {shlex.join(cmd)}\n")
        log.flush()
        forwarder.child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            code = forwarder.child.wait()
        finally:
            if forwarder.child.poll() is None:  # the comparison itself is dying: take it along
                forwarder.child.kill()
                forwarder.child.wait()
            forwarder.child = None
    if forwarder.received is not None:
        name = signal.Signals(forwarder.received).name
        raise Interrupted(f"{name} received: pretraining of strategy {strategy!r} was passed the "
                          f"signal and exited ({code}); re-run the same command to resume it "
                          f"from its last checkpoint (log: {log_path})", forwarder.received)
    run_dir = Path(cmd[cmd.index("--output-dir") + 1])
    result = finished_result(run_dir) if code == 0 else None
    if result is None:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        why = f"exit {code}" if code else "it stopped before max_steps"
        raise RunFailed(f"pretraining of strategy {strategy!r} failed ({why}); full log: "
                        f"{log_path}\n--- last lines of the log ---\n" + "\n".join(tail),
                        code if code else EXIT_RUN_FAILED)
    return result


class ParentRun:
    """The comparison's MLflow parent run, created once and reused by a re-run (its id is kept in
    OUTPUT_DIR/compare_state.json); tracking failures only warn."""

    def __init__(self, out: Path, experiment: str, name: str):
        from cmgems.tracking import Tracker
        from cmgems.tracking_uri import resolve_tracking_uri
        self.uri = resolve_tracking_uri(out)
        self.state_path = out / STATE_NAME
        old = self._old_run_id()
        self.tracker = Tracker(True, self.uri, experiment, name, run_id=old)
        self.run_id = self.tracker.run_id
        self.reused = old is not None
        if self.run_id:
            with atomic_path(self.state_path) as tmp:
                tmp.write_text(json.dumps({"parent_run_id": self.run_id, "tracking_uri": self.uri},
                                          indent=2) + "\n")

    def _old_run_id(self) -> str | None:
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return None
        if state.get("tracking_uri") != self.uri:
            return None  # another store: start a fresh parent there
        from mlflow.tracking import MlflowClient
        try:
            MlflowClient(self.uri).get_run(state["parent_run_id"])
        except Exception:  # noqa: BLE001 - deleted or unknown: a fresh parent
            return None
        return state["parent_run_id"]


def log_to_child(uri: str, experiment: str, run_id: str | None, metrics: dict[str, float],
                 artifacts: list[Path]) -> None:
    if not run_id:
        return
    from cmgems.tracking import Tracker
    child = Tracker(True, uri, experiment, run_id=run_id)
    child.log_metrics(metrics, 0)
    for a in artifacts:
        child.log_artifact(a, "fewshot")
    child.finish("FINISHED")


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


def evaluate_strategy(args, strategy: str, result: dict, tasks: list[FewshotTask], uri: str,
                      config) -> dict[str, dict]:
    from cmgems.finetune import fewshot
    model_dir = Path(result["output_dir"]) / "export"
    out: dict[str, dict] = {}
    for task in tasks:
        path = Path(result["output_dir"]) / "fewshot" / f"{task.slug}.json"
        expected = {"model_dir": str(model_dir), "train": str(task.train), "test": str(task.test),
                    "runs": args.runs, "seed": args.fewshot_seed,
                    "shots": args.shots if args.shots is not None else "all",
                    **dataclasses.asdict(config)}
        summary = cached_fewshot(path, expected)
        if summary is not None:
            print(f"  {strategy} / {task.name}: few-shot results already in {path}, reused",
                  flush=True)
        else:
            t0 = time.time()
            summary = fewshot(model_dir, task.train, task.test, runs=args.runs,
                              seed=args.fewshot_seed, shots=args.shots, config=config,
                              tracking=None, name=f"{strategy}/{task.name}", out_json=path)
            log_to_child(uri, args.experiment, result.get("mlflow_run_id"),
                         fewshot_metrics(task, summary), [path])
            print(f"  {strategy} / {task.name}: accuracy {100 * summary['mean']['accuracy']:.2f} "
                  f"± {100 * summary['std']['accuracy']:.2f} % over {args.runs} run(s) "
                  f"({time.time() - t0:.0f} s)", flush=True)
        out[task.name] = summary
    return out


def write_report(out: Path, strategies, results, tasks, fewshot_results, name: str) -> list[Path]:
    table = markdown_table(strategies, results, tasks, fewshot_results)
    md = out / "comparison.md"
    with atomic_path(md) as tmp:
        tmp.write_text(f"# Strategy comparison: {name}\n\n{table}")
    paths = [md]
    with atomic_path(out / "ref_perplexity.png") as tmp:
        ref_ppl_plot(strategies, results, tmp, f"{name}: validation perplexity, reference masking")
    paths.append(out / "ref_perplexity.png")
    if tasks:
        with atomic_path(out / "fewshot_accuracy.png") as tmp:
            fewshot_plot(strategies, tasks, fewshot_results, tmp, f"{name}: few-shot accuracy")
        paths.append(out / "fewshot_accuracy.png")
    summary = {"name": name, "strategies": strategies,
               "tasks": [{"name": t.name, "train": str(t.train), "test": str(t.test)} for t in tasks],
               "pretraining": {s: {"output_dir": results[s]["output_dir"],
                                   "mlflow_run_id": results[s].get("mlflow_run_id"),
                                   "step": results[s]["step"], "switch_step": switch_step(results[s]),
                                   "final_ppl_ref": (final_ref_ppl(results[s]) or (None, None))[1],
                                   "history": results[s].get("history", []),
                                   "events": results[s].get("events", [])} for s in strategies},
               "fewshot": {s: {t: {k: v for k, v in f.items() if k in ("mean", "std")}
                               for t, f in fewshot_results.get(s, {}).items()}
                           for s in strategies}}
    with atomic_path(out / "comparison.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    paths.append(out / "comparison.json")
    return paths


def _or_blank(value) -> str:
    return "" if value is None else str(value)


def compare(argv: list[str]) -> int:
    own, extra = split_passthrough(argv)
    args = build_parser().parse_args(own)
    strategies = parse_strategies(args.strategies)
    extra = shlex.split(args.pretrain_args) + extra
    check_passthrough(extra)
    tasks = unique_tasks([parse_fewshot(s) for s in args.fewshot])
    if args.runs < 1:
        raise InputError(f"--runs must be >= 1, got {args.runs}")
    if args.max_steps is not None and args.max_steps < 1:
        raise InputError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.config and not Path(args.config).is_file():
        raise InputError(f"--config {args.config}: no such file")
    if args.data_dir:
        args.data_dir = str(Path(args.data_dir).resolve())
    from cmgems.finetune import FinetuneConfig
    ft_config = FinetuneConfig(lr=args.finetune_lr, epochs=args.finetune_epochs,
                               batch_size=args.finetune_batch_size, device=args.finetune_device)
    num_gpus = gpu_count(args.num_gpus)
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or out.name

    finished = {s: finished_result(out / s) for s in strategies}
    for s, result in finished.items():
        bad = result is not None and config_mismatch(out / s, expected_fields(args, s))
        if bad:
            raise InputError(f"{out / s}: holds a finished run with other settings ({bad}); "
                             f"use another --output-dir or delete that folder")

    parent = ParentRun(out, args.experiment, name)
    print(f"comparison {name}: {len(strategies)} strategies ({', '.join(strategies)}), "
          f"{len(tasks)} few-shot task(s); output {out}; MLflow {parent.uri} parent run "
          f"{parent.run_id}{' (reused)' if parent.reused else ''}", flush=True)
    parent.tracker.log_params({"strategies": ",".join(strategies), "config": args.config or "",
                               "data_dir": args.data_dir or "", "max_steps": _or_blank(args.max_steps),
                               "model": args.model or "", "seed": _or_blank(args.seed),
                               "num_gpus": num_gpus, "pretrain_args": shlex.join(extra),
                               "fewshot": ";".join(f"{t.name}={t.train}:{t.test}" for t in tasks),
                               "fewshot.runs": args.runs, "fewshot.shots": _or_blank(args.shots) or "all",
                               "fewshot.seed": args.fewshot_seed,
                               "finetune": dataclasses.asdict(ft_config)})
    status = "FAILED"
    forwarder = SignalForwarder()
    try:
        results: dict[str, dict] = {}
        for i, s in enumerate(strategies, 1):
            run_dir, log_path = out / s, out / "logs" / f"{s}.log"
            result = finished[s]
            if result is not None:
                print(f"[{i}/{len(strategies)}] {s}: finished run found in {run_dir} "
                      f"(step {result['step']}), skipping its pretraining", flush=True)
            else:
                cmd = pretrain_command(args, s, run_dir, parent.run_id or "", name, extra, num_gpus)
                resumed = (run_dir / "checkpoints" / "latest_complete").is_file()
                print(f"[{i}/{len(strategies)}] {s}: "
                      + ("resuming the unfinished run from its last checkpoint" if resumed
                         else "pretraining") + f" (mode {STRATEGY_MODES[s]}) -> {run_dir}; "
                      f"log {log_path}", flush=True)
                t0 = time.time()
                result = run_pretraining(cmd, s, log_path, forwarder)
                ref = final_ref_ppl(result)
                sw = switch_step(result)
                print(f"[{i}/{len(strategies)}] {s}: done in {time.time() - t0:.0f} s, step "
                      f"{result['step']}, final ppl_ref {ref[1] if ref else float('nan'):.3f}"
                      + (f", switched {result['events'][0]['from']} -> "
                         f"{result['events'][0]['to']} at step {sw}" if sw is not None else ""),
                      flush=True)
            results[s] = result
        fewshot_results: dict[str, dict[str, dict]] = {}
        if tasks:
            print("few-shot evaluation", flush=True)
            for s in strategies:
                fewshot_results[s] = evaluate_strategy(args, s, results[s], tasks, parent.uri,
                                                       ft_config)
        paths = write_report(out, strategies, results, tasks, fewshot_results, name)
        metrics = {}
        for s in strategies:
            ref = final_ref_ppl(results[s])
            if ref:
                metrics[f"{s}/final_ppl_ref"] = ref[1]
            if switch_step(results[s]) is not None:
                metrics[f"{s}/switch_step"] = switch_step(results[s])
            for task in tasks:
                metrics.update({f"{s}/{k}": v for k, v in
                                fewshot_metrics(task, fewshot_results[s][task.name]).items()})
        parent.tracker.log_metrics(metrics, 0)
        for p in paths:
            parent.tracker.log_artifact(p)
        status = "FINISHED"
    except (Interrupted, KeyboardInterrupt):
        status = "KILLED"
        raise
    finally:
        parent.tracker.finish(status)
    print((out / "comparison.md").read_text())
    print("wrote " + ", ".join(str(p) for p in paths), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return compare(sys.argv[1:] if argv is None else argv)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except (RunFailed, Interrupted) as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
