"""A dataset directory's names: the one place that spells them.

    DATA_DIR/
      manifest.json      what the dataset holds, written last (cmgems.data.shards.Manifest)
      npmi.tsv           the NPMI table the shards were scored with (cmgems.data.npmi_table)
      train-00000.h5 ... the shards of each split (cmgems.data.shards)
      valid-00000.h5 ...

Torch-free and dependency-free, so launchers and preprocessing can ask where a file is without
importing the reader.
"""
from __future__ import annotations

from pathlib import Path

SPLITS = ("train", "valid")
MANIFEST_NAME = "manifest.json"
TABLE_NAME = "npmi.tsv"


def shard_name(split: str, index: int) -> str:
    """The file name of shard `index` of `split`: shard_name("valid", 3) == "valid-00003.h5"."""
    return f"{split}-{index:05d}.h5"


# Everything a finished dataset consists of (globs), manifest first.
DATASET_FILES = (MANIFEST_NAME, TABLE_NAME, *(f"{split}-*.h5" for split in SPLITS))


class DatasetDir:
    """The paths of one dataset directory (nothing is read or checked here)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest = self.root / MANIFEST_NAME
        self.npmi_table = self.root / TABLE_NAME

    def holds_dataset(self) -> bool:
        """A manifest is written last: its presence marks a finished dataset."""
        return self.manifest.is_file()
