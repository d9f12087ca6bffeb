"""A pretraining run's directory: the one place that spells its names.

    OUTPUT_DIR/
      .cmgems.lock             held by the one training writing here (cmgems.pretrain.run_dir)
      config.json              the run's PretrainConfig
      ds_config.json           the DeepSpeed config as filled in
      checkpoints/             DeepSpeed checkpoints and our records (cmgems.pretrain.checkpoint)
      export/                  the final Hugging Face export; export/step-N/ exports along the way
      curriculum_events.json   the curriculum's switches
      perplexity.png           validation perplexity with the switches marked
      result.json              the run's outcome (cmgems.pretrain.result.RunResult)

Torch-free, so a comparison or a launcher can find a run's files without importing the trainer.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run directory (nothing is read or created here)."""
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def lock(self) -> Path:
        return self.root / ".cmgems.lock"

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def ds_config(self) -> Path:
        return self.root / "ds_config.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def export(self) -> Path:
        return self.root / "export"

    def step_export(self, step: int) -> Path:
        return self.export / f"step-{step}"

    @property
    def events(self) -> Path:
        return self.root / "curriculum_events.json"

    @property
    def perplexity_plot(self) -> Path:
        return self.root / "perplexity.png"

    @property
    def result(self) -> Path:
        return self.root / "result.json"
