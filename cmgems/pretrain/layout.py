"""A pretraining run's directory: the one place that spells its names.

    OUTPUT_DIR/
      .cmgems.lock             held by the one training writing here (cmgems.pretrain.run_dir)
      config.json              the run's PretrainConfig
      ds_config.json           the DeepSpeed config as filled in
      checkpoints/             DeepSpeed checkpoints and our records (cmgems.pretrain.checkpoint)
      export/                  the final Hugging Face export; export/step-N/ exports along the way
      curriculum_events.json   the curriculum's switches
      perplexity.png           validation perplexity with the switches marked
      masks.png                the run's maskings on 4 validation samples (cmgems masks)
      result.json              the run's outcome (cmgems.pretrain.result.RunResult)

Torch-free, so a comparison or a launcher can find a run's files without importing the trainer.
"""
from __future__ import annotations

from pathlib import Path


class RunLayout:
    """The paths of one run directory (nothing is read or created here)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.lock = self.root / ".cmgems.lock"
        self.config = self.root / "config.json"
        self.ds_config = self.root / "ds_config.json"
        self.checkpoints = self.root / "checkpoints"
        self.export = self.root / "export"
        self.events = self.root / "curriculum_events.json"
        self.perplexity_plot = self.root / "perplexity.png"
        self.masks_plot = self.root / "masks.png"
        self.result = self.root / "result.json"

    def step_export(self, step: int) -> Path:
        return self.export / f"step-{step}"
