"""Comparing masking strategies: what to compare (CompareConfig, the strategy and few-shot task
lists) and what an earlier comparison already finished.

A comparison pretrains one run per strategy and finetunes each export on few-shot tasks
(cmgems.compare.run); cmgems.compare.report turns the results into a table and plots.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cmgems.pretrain.config import MODELS
from cmgems.options import DEFAULT_SEED, option
from cmgems.masking.names import MODE_OF_SHORT_NAME, PMI_LOOKUPS
from cmgems.errors import InputError
from cmgems.evaluation.tasks import TASK_FILE_SUFFIXES, task_file
from cmgems.pretrain.layout import RunLayout

# A comparison's strategies are the modes under their short names (fixed:<s> named <s>), in the
# modes' order (the fixed baselines first).
STRATEGY_MODES = MODE_OF_SHORT_NAME
DEFAULT_STRATEGIES = tuple(STRATEGY_MODES)
# A PMI strategy may name where it reads NPMI, STRATEGY@LOOKUP (global@position): one comparison
# then holds both readings of the same strategy, paired like any two strategies.
LOOKUP_SEPARATOR = "@"


def split_strategy(name: str) -> tuple[str, str | None]:
    """'global@position' -> ('global', 'position'); 'global' -> ('global', None)."""
    base, sep, lookup = name.partition(LOOKUP_SEPARATOR)
    return base, (lookup if sep else None)


def strategy_mode(name: str) -> str:
    """The pretraining --mode of a (possibly STRATEGY@LOOKUP) strategy name."""
    return STRATEGY_MODES[split_strategy(name)[0]]


def strategy_label(name: str) -> str:
    """The mode column of the report: the mode, and the lookup when the name fixes one."""
    lookup = split_strategy(name)[1]
    return strategy_mode(name) + (f", pmi_lookup {lookup}" if lookup else "")


def parse_strategies(text: str) -> list[str]:
    """'random,cm_gems,cm_gems@position' -> the same list (order kept, duplicates refused)."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise InputError("--strategies: empty list")
    for name in names:
        base, lookup = split_strategy(name)
        if base not in STRATEGY_MODES:
            raise InputError(f"--strategies: unknown strategy {name!r}; choose from "
                             f"{', '.join(STRATEGY_MODES)}, each PMI one optionally as "
                             f"STRATEGY{LOOKUP_SEPARATOR}LOOKUP ({' or '.join(PMI_LOOKUPS)})")
        if lookup is not None:
            if base == "random":
                raise InputError(f"--strategies: {name!r}: random masking reads no NPMI, so it "
                                 "takes no lookup")
            if lookup not in PMI_LOOKUPS:
                raise InputError(f"--strategies: {name!r}: unknown lookup {lookup!r}; choose "
                                 f"from {', '.join(PMI_LOOKUPS)}")
    if len(set(names)) != len(names):
        raise InputError(f"--strategies: {text!r} names a strategy twice")
    return names


def parse_seeds(text: str) -> list[int]:
    """'1,2,3' -> [1, 2, 3] (order kept; duplicates and non-integers refused)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise InputError("--seeds: empty list")
    try:
        seeds = [int(p) for p in parts]
    except ValueError:
        raise InputError(f"--seeds {text!r}: expected comma-separated integers") from None
    if len(set(seeds)) != len(seeds):
        raise InputError(f"--seeds {text!r} names a seed twice")
    if any(x < 0 for x in seeds):
        raise InputError(f"--seeds {text!r}: seeds must be >= 0")
    return seeds


@dataclass(frozen=True)
class PretrainRun:
    """One pretraining of a comparison: a strategy under one seed, in OUTPUT_DIR/<label>."""

    label: str  # folder, log and MLflow name: the strategy, or <strategy>-seed<S> with --seeds
    strategy: str
    seed: int | None  # None: the pretraining config's seed


@dataclass(frozen=True)
class FewshotTask:
    """One few-shot evaluation: a training and a test file (.tsv k-mer text or .csv)."""

    name: str  # label in the table, the plots and the MLflow metric names
    train: Path  # training file: the pool each run draws its n examples per class from
    test: Path  # test file

    def __post_init__(self):
        if not self.name or any(c in self.name for c in "|\n"):
            raise InputError(f"few-shot task name {self.name!r}: must be non-empty, without '|'")
        for what, path in (("train", self.train), ("test", self.test)):
            if not path.is_file():
                raise InputError(f"few-shot task {self.name}: {what} file {path} does not exist")
            if path.suffix not in TASK_FILE_SUFFIXES:
                raise InputError(f"few-shot task {self.name}: {what} file {path} must end in "
                                 f"{' or '.join(TASK_FILE_SUFFIXES)}")

    @property
    def slug(self) -> str:
        """File-name-safe form of the name (for the per-task JSON of each strategy)."""
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in self.name)


def _task_from_folder(name: str | None, folder: Path, spec: str) -> FewshotTask:
    """A folder holding train.tsv/.csv; its test file sits beside it or, as in GeneMask's
    prom-core/<shots>/train.tsv + prom-core/test.tsv layout, one level up."""
    train = task_file(folder, "train")
    test = task_file(folder, "test") or task_file(folder.parent, "test")
    if train is None or test is None:
        raise InputError(f"--fewshot {spec}: folder {folder} needs train.tsv (or .csv) and a "
                         f"test.tsv (or .csv) beside it or in its parent")
    return FewshotTask(name or f"{folder.resolve().parent.name}/{folder.resolve().name}",
                       train, test)


def parse_fewshot(spec: str) -> FewshotTask:
    """NAME=TRAIN:TEST, TRAIN:TEST, NAME=FOLDER or FOLDER (see _task_from_folder)."""
    name, sep, rest = spec.partition("=")
    if not sep:
        name, rest = None, spec
    elif not name.strip():
        raise InputError(f"--fewshot {spec!r}: empty task name before '='")
    rest = rest.strip()
    if not rest:
        raise InputError(f"--fewshot {spec!r}: no files given")
    if Path(rest).is_dir():
        return _task_from_folder(name, Path(rest), spec)
    train, colon, test = rest.rpartition(":")
    if not colon or not train:
        raise InputError(f"--fewshot {spec!r}: expected NAME=TRAIN:TEST or a folder "
                         f"({rest} is not a folder)")
    train_p, test_p = Path(train), Path(test)
    return FewshotTask(name or f"{train_p.resolve().parent.name}/{train_p.stem}", train_p, test_p)


def unique_tasks(tasks: list[FewshotTask]) -> list[FewshotTask]:
    names = [t.name for t in tasks]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise InputError(f"--fewshot: two tasks are named {dup!r}; name them with NAME=...")
    return tasks


def config_mismatch(run_dir: Path, expected: dict) -> str | None:
    """Which requested field a finished run's config.json contradicts, if any (a run kept from an
    earlier comparison with other settings must not be reused silently)."""
    path = RunLayout(run_dir).config
    try:
        got = json.loads(path.read_text())
    except (OSError, ValueError):
        return f"{path} is missing or unreadable"
    for key, want in expected.items():
        have = got.get(key)
        if key == "data_dir" and have is not None:
            same = Path(have).resolve() == Path(want).resolve()
        else:
            same = have == want
        if not same:
            return f"{key} is {have!r} there, {want!r} requested"
    return None


@dataclass
class CompareConfig:
    """What a comparison runs. Pretraining options left unset (None) take the pretraining
    config's values; the finetuning hyperparameters are a FinetuneConfig beside this."""

    # --- what to compare ------------------------------------------------------------------------
    strategies: str = option(",".join(DEFAULT_STRATEGIES), "Comma-separated strategies, each "
                             "pretrained once: " + ", ".join(f"{k} (mode {v})" for k, v in
                                                             STRATEGY_MODES.items()) +
                             f"; a PMI strategy as STRATEGY{LOOKUP_SEPARATOR}LOOKUP "
                             "(global@position) sets that run's --pmi-lookup.")
    output_dir: str = option("runs/compare", "Comparison folder: one run folder per strategy, "
                             "logs, report, and the default MLflow store OUTPUT_DIR/mlflow.db; "
                             "reuse it to skip finished runs.")
    name: str | None = option(None, "MLflow parent run name; children are NAME-<strategy> "
                              "(default: the output folder's name).")
    experiment: str = option("cmgems-compare", "MLflow experiment of the parent and child runs; "
                             "MLFLOW_TRACKING_URI selects a server instead of "
                             "OUTPUT_DIR/mlflow.db.")
    # --- pretraining, the same for every strategy ------------------------------------------
    config: str | None = option(None, "Pretraining config file, YAML or JSON (default: "
                                "launchers/pretrain.py's, launchers/configs/quick.yaml).")
    data_dir: str | None = option(None, "Dataset folder (manifest.json + shards); built from the "
                                  "config's genome on first use when empty (default: the "
                                  "config's).")
    max_steps: int | None = option(None, "Step budget of every run (default: the config's).")
    model: str | None = option(None, "Model size: logo (2 layers) or dnabert (BERT-base) "
                               "(default: the config's).", choices=MODELS)
    seed: int | None = option(None, "Seed of every run: same init, data order and masking "
                              "randomness (default: the config's).")
    seeds: str | None = option(None, "Comma-separated pretraining seeds, e.g. 1,2,3: every "
                               "strategy is pretrained once per seed, into "
                               "OUTPUT_DIR/<strategy>-seed<S>, and the report pairs the "
                               "strategies over (seed, few-shot draw). One seed is --seed.")
    num_gpus: int | None = option(None, "GPUs per run: > 0 launches `deepspeed --num_gpus N`, 0 "
                                  "plain python on CPU (default: every visible GPU, 0 when there "
                                  "is none).")
    pretrain_args: str = option("", "More launchers/pretrain.py options for every run, one quoted "
                                "string, e.g. \"--max-length 128 --eval-interval 25\"; anything "
                                "after a bare `--` is passed on too.")
    # --- few-shot evaluation of each export ------------------------------------------------
    fewshot: tuple[str, ...] = option((), "Few-shot task specs (see parse_fewshot).", cli=False)
    runs: int = option(10, "Seeded finetuning runs per task, reported as mean ± std (10: "
                       "GeneMask's protocol).")
    shots: int | None = option(None, "n: examples per class each run draws, without "
                               "replacement, from the task's training file (the pool); run r's "
                               "draw follows from (fewshot seed, r). Default: inferred when the "
                               "file holds exactly n of every class.")
    fewshot_seed: int = option(DEFAULT_SEED, "Seed of the first finetuning run; run r uses "
                               "seed+r.")

    def __post_init__(self):
        self.fewshot = tuple(self.fewshot)
        parse_strategies(self.strategies)
        if self.runs < 1:
            raise InputError(f"--runs must be >= 1, got {self.runs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise InputError(f"--max-steps must be >= 1, got {self.max_steps}")
        if self.num_gpus is not None and self.num_gpus < 0:
            raise InputError(f"--num-gpus must be >= 0, got {self.num_gpus}")
        if self.config and not Path(self.config).is_file():
            raise InputError(f"--config {self.config}: no such file")
        if self.data_dir:
            self.data_dir = str(Path(self.data_dir).resolve())
        if self.seeds is not None:
            if self.seed is not None:
                raise InputError("--seed and --seeds: give one of them")
            seeds = parse_seeds(self.seeds)
            if len(seeds) == 1:  # one seed is today's one-seed comparison, folders and all
                self.seed, self.seeds = seeds[0], None

    @property
    def strategy_list(self) -> list[str]:
        return parse_strategies(self.strategies)

    @property
    def seed_list(self) -> list[int | None]:
        return parse_seeds(self.seeds) if self.seeds else [self.seed]

    @property
    def pretrain_runs(self) -> list[PretrainRun]:
        """Every pretraining, seed by seed, each seed in the strategies' order."""
        if not self.seeds:
            return [PretrainRun(s, s, self.seed) for s in self.strategy_list]
        return [PretrainRun(f"{s}-seed{seed}", s, seed) for seed in self.seed_list
                for s in self.strategy_list]

