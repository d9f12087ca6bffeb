"""Pretrain a DNA language model with a masking curriculum on DeepSpeed.

    python launchers/pretrain.py                        # quick CM-GEMS run on the bundled genome
    deepspeed --num_gpus 8 launchers/pretrain.py --config launchers/configs/reference.yaml \\
        --data-dir data/grch38
    python launchers/pretrain.py --output-dir runs/x --resume

Fields come from defaults <- --config file <- command-line options; every field is listed below.
Paths are read relative to the working directory (outputs land in runs/ and the default dataset in
data/ there); a config, DeepSpeed config or genome named as in these docs that is not there is
taken from the files shipped with cmgems.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if (ROOT / "cmgems").is_dir():  # run from a checkout: its own cmgems, not an installed copy
    sys.path.insert(0, str(ROOT))

from cmgems import bundled, logs  # noqa: E402
from cmgems.pretrain.config import PretrainConfig, from_sources  # noqa: E402
from cmgems.errors import EXIT_INPUT_ERROR, InputError  # noqa: E402
from cmgems.options import add_arguments, load_file  # noqa: E402
from cmgems.data.layout import DatasetDir  # noqa: E402

QUICK = "launchers/configs/quick.yaml"  # the config of a run without --config
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML or JSON file of config fields (default: "
                   f"{QUICK} when no --config is given)")
    p.add_argument("--resume", action="store_true", help="Continue the run in --output-dir from "
                   "its latest complete checkpoint (same MLflow run); starts fresh if it has none.")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # passed by the deepspeed launcher; LOCAL_RANK is used
    p.add_argument("--skip-verify", dest="verify_data", action="store_false", default=None,
                   help="Same as --no-verify-data: start without hashing the shards.")
    add_arguments(p, PretrainConfig, defaults=load_file(bundled.path(QUICK), PretrainConfig),
                  title=f"config fields (override --config; the defaults shown are a run's "
                        f"without --config: {QUICK} over the built-in defaults)")
    return p.parse_args(argv)


def ensure_dataset(cfg) -> None:
    """Build data_dir from cfg.genome when it holds no dataset yet (local rank 0 builds, the other
    ranks of the node wait for the manifest)."""
    if DatasetDir(cfg.data_dir).holds_dataset():
        return
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print(f"{cfg.data_dir}: no dataset yet; building it from {cfg.genome}", file=sys.stderr)
        # the preprocessing of this cmgems (checkout or installed), run in the user's working
        # directory; its report goes to stderr with the other logs: stdout is this command's
        # result line
        env = dict(os.environ)
        if bundled.CHECKOUT is not None:
            env["PYTHONPATH"] = os.pathsep.join(
                [str(bundled.CHECKOUT), *filter(None, [os.environ.get("PYTHONPATH")])])
        res = subprocess.run([sys.executable, "-m", bundled.preprocessing_module(), "build",
                              cfg.genome, cfg.data_dir, "--min-count", str(cfg.min_count)],
                             env=env, stdout=sys.stderr)
        if res.returncode != 0:
            raise InputError(f"{cfg.genome}: preprocessing into {cfg.data_dir} failed "
                             f"(exit {res.returncode}, see above)")
    else:
        while not DatasetDir(cfg.data_dir).holds_dataset():
            time.sleep(2)


@contextlib.contextmanager
def result_only_on_stdout():
    """Send everything written to stdout in the block (DeepSpeed's notices and warnings, a C++
    op build's output, at the file-descriptor level) to stderr; yields a stream to the real
    stdout, for the result line: stdout of a run is its JSON result alone."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with os.fdopen(os.dup(saved), "w") as real:
            yield real
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def one_log_format() -> None:
    """DeepSpeed's and MLflow's lines in the run's format (cmgems.logs): their handlers exist
    once they are imported, which training does anyway."""
    from cmgems.pretrain import deepspeed_env
    deepspeed_env.quiet_notices()  # before the import: its accelerator notice comes at import
    for library in ("deepspeed", "mlflow"):
        importlib.import_module(library)
    logs.adopt()


def main(argv=None) -> int:
    args = parse_args(argv)
    logs.configure(logging.INFO)
    try:
        config = bundled.resolve(args.config, "--config") if args.config else bundled.path(QUICK)
        cfg = from_sources(str(config), args)
        if not DatasetDir(cfg.data_dir).holds_dataset():  # else the genome is not read
            cfg.genome = bundled.resolve(cfg.genome, "genome")
        cfg.ds_config = bundled.resolve(cfg.ds_config, "ds_config")
        # imported once the config is read: torch, transformers and DeepSpeed take seconds, and
        # --help or a config error should not wait for them
        from cmgems.pretrain import preflight
        preflight.check(cfg, args.resume)
        ensure_dataset(cfg)
        from cmgems.pretrain.trainer import Trainer
        one_log_format()
        with result_only_on_stdout() as stdout:
            result = Trainer(cfg, resume=args.resume).train()
            if int(os.environ.get("RANK", "0")) == 0:
                print(json.dumps({k: getattr(result, k) for k in (
                    "output_dir", "step", "stage", "stopped_by", "mlflow_run_id", "events")}),
                      file=stdout, flush=True)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training began
        print("error: interrupted (Ctrl-C); the checkpoints written so far are kept: --resume "
              "continues from the newest", file=sys.stderr)
        return EXIT_INTERRUPTED
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if result.stopped_by == "SIGINT":
        if main_rank:
            print(f"stopped by Ctrl-C after step {result.step}, checkpointed: --resume "
                  f"continues it", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
