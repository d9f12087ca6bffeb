"""Masking curricula: which masking each sample of a training step is masked with (the names
are cmgems.masking.names').

- fixed:<strategy>: one strategy throughout (random, genemask or global).
- cm_step (CM-Step baseline): training is cut into 100 equal blocks of max_steps; in block b
  (0..99, b = step * 100 // max_steps) global is used with probability b / 100, else random.
  The paper leaves open what one draw covers. `draw="batch"` (the default): one draw per
  micro-batch, all its samples masked alike, as the public CM-Step code does (it draws once per
  call of its collator, i.e. per micro-batch of 10 before gradient accumulation); the numbers
  the paper reports come from that code. `draw="sample"`: one draw per sample, which gives every
  micro-batch the same expected mix with less variance between micro-batches. Both keep the
  expected share of global at b / 100 in block b.
- cm_gems (CM-GEMS): genemask until the change in validation perplexity between two
  consecutive evaluations falls below `threshold` for `patience` consecutive evaluations (and
  not before `min_steps`), then global for the rest of training; it never switches back.
  `switch_rule` says which change: "drop" (previous - current, signed: a rise counts as below),
  "abs_change" (|previous - current|), or "min_abs_change" (the smallest |change| between any
  two consecutive evaluations so far, as the published CM-GEMS script recomputes it from its
  whole perplexity file; once below it stays below, so with patience 1 it decides as
  abs_change).

The trainer all-reduces the validation perplexity before observe(), so a schedule is a pure
function of its inputs and every rank holds the same one. Steps are 0-based global steps.
"""
from __future__ import annotations

import abc
import itertools
import math
from dataclasses import dataclass, field

import torch

from cmgems.errors import InputError
from cmgems.masking.names import CM_GEMS, CM_STEP, CURRICULUM_MASKINGS, parse_mode

CM_STEP_BLOCKS = 100
CM_STEP_DRAWS = ("batch", "sample")
SWITCH_RULES = ("drop", "abs_change", "min_abs_change")
# Validation masking: "frozen" = the same positions at every evaluation (the number moves with
# the model only); "fresh" = the training masking of the step, drawn anew at each evaluation,
# as the published scripts evaluate.
EVAL_MASKINGS = ("frozen", "fresh")


@dataclass
class ScheduleConfig:
    mode: str
    """fixed:random | fixed:genemask | fixed:global | cm_step | cm_gems."""
    max_steps: int
    """Total training steps; cm_step's blocks are max_steps / 100 long."""
    threshold: float = 1.0
    """cm_gems: switch once the perplexity drop between consecutive evaluations is below this."""
    patience: int = 1
    """cm_gems: consecutive evaluations below the threshold needed for the switch."""
    min_steps: int = 0
    """cm_gems: no switch at an evaluation before this step."""
    draw: str = "batch"
    """cm_step: one random-or-global draw per micro-batch ("batch") or per sample ("sample")."""
    switch_rule: str = "drop"
    """cm_gems: which perplexity change is compared with the threshold (SWITCH_RULES)."""

    def __post_init__(self):
        parse_mode(self.mode)
        if not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise InputError(f"curriculum max_steps: must be a positive integer, "
                             f"got {self.max_steps!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not math.isfinite(self.threshold) or self.threshold < 0:
            raise InputError(f"curriculum threshold: must be finite and >= 0, "
                             f"got {self.threshold!r}")
        self.threshold = float(self.threshold)
        if not isinstance(self.patience, int) or self.patience < 1:
            raise InputError(f"curriculum patience: must be an integer >= 1, got {self.patience!r}")
        if not isinstance(self.min_steps, int) or self.min_steps < 0:
            raise InputError(f"curriculum min_steps: must be an integer >= 0, "
                             f"got {self.min_steps!r}")
        if self.draw not in CM_STEP_DRAWS:
            raise InputError(f"curriculum draw: must be one of {CM_STEP_DRAWS}, "
                             f"got {self.draw!r}")
        if self.switch_rule not in SWITCH_RULES:
            raise InputError(f"curriculum switch_rule: must be one of {SWITCH_RULES}, "
                             f"got {self.switch_rule!r}")


@dataclass
class _Schedule(abc.ABC):
    config: ScheduleConfig
    history: list[tuple[int, float]] = field(default_factory=list)
    """(step, validation perplexity) of every observed evaluation."""
    events: list[dict] = field(default_factory=list)
    """Stage switches: {step, from, to, perplexity_history}."""

    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    @abc.abstractmethod
    def stages(self) -> tuple[str, ...]:
        """Names of the stages, in order."""

    @property
    def stage(self) -> str:
        """Name of the current stage."""
        return self.stages[self.stage_index]

    @property
    def stage_index(self) -> int:
        return 0

    @property
    def switch_step(self) -> int | None:
        """The step of the first switch; None while there has been none."""
        return self.events[0]["step"] if self.events else None

    @property
    def first_strategy(self) -> str:
        """The masking the frozen validation masking uses."""
        return parse_mode(self.mode).first_masking

    @abc.abstractmethod
    def describe(self) -> str:
        """The schedule in a sentence, for a model card."""

    def strategies(self, step: int, batch_size: int, generator: torch.Generator,
                   stage_index: int | None = None) -> list[str]:
        """The masking of each sample of a micro-batch at `step`.

        Args:
            step: the 0-based optimizer step.
            batch_size: samples in the micro-batch.
            generator: the micro-batch's own generator, for a curriculum that draws.
            stage_index: the stage to mask with instead of this schedule's own (for a copy that
                follows a curriculum decided elsewhere, as cmgems.hf's collator in each
                DataLoader worker).
        Returns:
            batch_size masking names.
        """
        index = self.stage_index if stage_index is None else stage_index
        return [self.stages[index]] * batch_size

    def observe(self, step: int, perplexity: float) -> dict | None:
        """Record a validation perplexity; returns the switch event if the stage changes."""
        self.history.append((int(step), float(perplexity)))
        return None

    def state_dict(self) -> dict:
        return {"mode": self.mode, "history": [list(h) for h in self.history],
                "events": [dict(e) for e in self.events]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("mode") != self.mode:
            raise InputError(f"curriculum: checkpoint was trained with mode {state.get('mode')!r}, "
                             f"the configuration says {self.mode!r}")
        self.history = [(int(s), float(p)) for s, p in state["history"]]
        self.events = [dict(e) for e in state["events"]]


class FixedSchedule(_Schedule):
    @property
    def stages(self) -> tuple[str, ...]:
        return (parse_mode(self.mode).fixed,)

    def describe(self) -> str:
        return f"one strategy throughout: {self.stage}"


class CMStepSchedule(_Schedule):
    @property
    def stages(self) -> tuple[str, ...]:
        return (CM_STEP,)

    def describe(self) -> str:
        return "CM-Step: random masking, turning into GLOBAL masking in 100 equal steps"

    def global_probability(self, step: int) -> float:
        block = min(CM_STEP_BLOCKS - 1, max(0, step) * CM_STEP_BLOCKS // self.config.max_steps)
        return block / CM_STEP_BLOCKS

    def strategies(self, step: int, batch_size: int, generator: torch.Generator,
                   stage_index: int | None = None) -> list[str]:
        # The generator is the micro-batch's own (seed, micro-batch, rank): either reading is a
        # pure function of those, so a resumed run draws the same.
        n = 1 if self.config.draw == "batch" else batch_size
        draws = torch.rand(n, generator=generator, device=generator.device)
        use_global = (draws < self.global_probability(step)).tolist()
        if self.config.draw == "batch":
            use_global = use_global * batch_size
        start, end = CURRICULUM_MASKINGS[CM_STEP]
        return [end if g else start for g in use_global]


class CMGemsSchedule(_Schedule):
    def __init__(self, config: ScheduleConfig):
        super().__init__(config)
        self.below = 0  # consecutive evaluations whose drop fell below the threshold

    @property
    def stages(self) -> tuple[str, ...]:
        return CURRICULUM_MASKINGS[CM_GEMS]

    def describe(self) -> str:
        c = self.config
        change = {"drop": "drops by", "abs_change": "changes by",
                  "min_abs_change": "has once changed by"}[c.switch_rule]
        return (f"CM-GEMS: GeneMask masking until validation perplexity {change} less than "
                f"{c.threshold} for {c.patience} consecutive evaluation(s) (not before step "
                f"{c.min_steps}), then GLOBAL top-NPMI masking")

    @property
    def stage_index(self) -> int:
        return 1 if self.events else 0

    def observe(self, step: int, perplexity: float) -> dict | None:
        previous = self.history[-1][1] if self.history else None
        super().observe(step, perplexity)
        if self.events or previous is None:
            return None
        change = self._change(previous, float(perplexity))
        # A non-finite change (a diverged or overflowing perplexity) is no sign of a plateau.
        below = math.isfinite(change) and change < self.config.threshold
        self.below = self.below + 1 if below else 0
        if self.below < self.config.patience or step < self.config.min_steps:
            return None
        event = {"step": int(step), "from": self.stages[0], "to": self.stages[1],
                 "perplexity_history": [p for _, p in self.history]}
        self.events.append(event)
        return dict(event)

    def _change(self, previous: float, current: float) -> float:
        """The number the rule compares with the threshold (history already holds current)."""
        rule = self.config.switch_rule
        if rule == "drop":
            return previous - current
        if rule == "abs_change":
            return abs(previous - current)
        ppl = [p for _, p in self.history]
        changes = [abs(b - a) for a, b in itertools.pairwise(ppl)]
        return min((c for c in changes if math.isfinite(c)), default=math.inf)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "below": self.below}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.below = int(state.get("below", 0))


def make_schedule(mode: str, max_steps: int, threshold: float = 1.0, patience: int = 1,
                  min_steps: int = 0, draw: str = "batch", switch_rule: str = "drop") -> _Schedule:
    config = ScheduleConfig(mode, max_steps, threshold, patience, min_steps, draw, switch_rule)
    kind = {CM_STEP: CMStepSchedule, CM_GEMS: CMGemsSchedule}
    return kind.get(parse_mode(mode).curriculum, FixedSchedule)(config)
