"""What a pretraining run ends with: RunResult, written once by the trainer into result.json and
read back by everything that looks at finished runs (the comparison, its report and plots).

result.json keeps the layout it always had: `final_ppl` is present only for a run that trained
to the end, `tracking` only where rank 0 wrote the file.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cmgems.io import atomic_path
from cmgems.masking.names import MASKINGS
from cmgems.pretrain.layout import RunLayout


@dataclass
class RunResult:
    """A run's outcome.

    Attributes:
        step: the last optimizer step trained.
        stopped_by: the signal that stopped the run early (None: it trained to max_steps).
        output_dir: the run directory.
        mlflow_run_id: its MLflow run.
        stage: the masking the curriculum was using at the end.
        switch_step: the step of the curriculum's first switch (None: it never switched).
        events: every curriculum switch, {"step", "from", "to", ...}.
        history: every evaluation, {"step", "ppl", "ppl_ref", "stage"}.
        final_ppl: {masking: validation perplexity of the final model under that frozen masking}
            (None for a masking the dataset's NPMI table cannot support); None if stopped early.
        tracking: what the tracker sent, retried and lost (Tracker.summary()).
    """
    step: int
    stopped_by: str | None
    output_dir: str
    mlflow_run_id: str | None
    stage: str
    switch_step: int | None
    events: list = field(default_factory=list)
    history: list = field(default_factory=list)
    final_ppl: dict | None = None
    tracking: dict | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items()
                if v is not None or k not in ("final_ppl", "tracking")}

    def write(self, path: Path) -> Path:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def load(cls, path: Path) -> "RunResult | None":
        """The result in path; None if there is none or it is unreadable (a run killed while
        writing it did not finish cleanly)."""
        try:
            data = json.loads(Path(path).read_text())
            return cls(**{k: data.get(k) for k in cls.__dataclass_fields__
                          if k in data or k in ("final_ppl", "tracking")})
        except (OSError, ValueError, TypeError):
            return None

    @classmethod
    def finished(cls, run_dir: Path) -> "RunResult | None":
        """The run's result when it trained to the end and its export is complete, else None."""
        layout = RunLayout(run_dir)
        result = cls.load(layout.result)
        if result is None or result.stopped_by is not None \
                or not (layout.export / "config.json").is_file():
            return None
        return result

    def final_ppl_of(self) -> dict[str, float | None]:
        """{masking: final perplexity under that frozen validation masking} for every masking;
        None for one (or a run) that lacks it."""
        got = self.final_ppl or {}
        return {m: (float(got[m]) if isinstance(got.get(m), (int, float)) else None)
                for m in MASKINGS}

    def final_ref_ppl(self) -> tuple[int, float] | None:
        """(step, reference-masking perplexity) of the last evaluation, if any."""
        hist = self.history or []
        return (int(hist[-1]["step"]), float(hist[-1]["ppl_ref"])) if hist else None
