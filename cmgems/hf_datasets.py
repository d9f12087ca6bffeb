"""cmgems data as Hugging Face `datasets` (the optional extra `cmgems[datasets]`).

- `shard_dataset(data_dir, split)`: one split of a preprocessed dataset, one row per sample with
  its k-mer ids (`input_ids`, without [CLS]/[SEP]: the trainer adds them) and their NPMI values
  (`npmi`). The columns are Arrow list arrays over the shards' own buffers (memory maps of the
  HDF5 datasets where they are contiguous), so a GRCh38 split opens in a blink and is read only
  where it is indexed. The shards are checked as the trainer checks them (format, checksum).
- `task_dataset(task_dir_or_file, k)`: a classification task (a GUE folder with train.csv,
  dev.csv, test.csv, or few-shot .tsv/.csv files) as a DatasetDict with the nucleotide
  `sequence`, the `label`, and the model's `input_ids` ([CLS] k-mers [SEP], cut to max_length as
  finetuning cuts them).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cmgems.data.layout import DatasetDir
from cmgems.data.shards import Manifest, ShardReader, verify
from cmgems.errors import InputError
from cmgems.evaluation.tasks import OVERFLOW_MODES, encode, read_examples, task_file

TASK_SPLITS = ("train", "dev", "test")


def _require_datasets():
    try:
        import datasets
        import pyarrow
    except ImportError:
        raise InputError("the datasets bridge needs the `datasets` package: "
                         "pip install 'cmgems[datasets]'") from None
    return datasets, pyarrow


def _list_column(pa, values: np.ndarray, offsets: np.ndarray):
    """A LargeList array whose row i is values[offsets[i]:offsets[i+1]], without a copy of
    values (Arrow wraps the numpy buffer, a memory map stays a memory map)."""
    return pa.LargeListArray.from_arrays(pa.array(offsets.astype(np.int64)),
                                         pa.array(values, from_pandas=False))


def shard_dataset(data_dir: str | Path, split: str = "train", verify_checksums: bool = True):
    """One split of a cmgems dataset folder as a `datasets.Dataset` (input_ids, npmi)."""
    datasets, pa = _require_datasets()
    directory = Path(data_dir)
    manifest = Manifest.load(directory)
    entries = manifest.split_shards(split)
    if not entries:
        splits = sorted({s["split"] for s in manifest.shards})
        raise InputError(f"{DatasetDir(directory).manifest}: no {split!r} shards (splits: "
                         f"{', '.join(splits) or 'none'})")
    verify(directory, manifest, checksums=verify_checksums)
    ids_chunks, npmi_chunks = [], []
    for entry in entries:
        reader = ShardReader(directory / entry["path"])
        tokens, npmi = (np.asarray(a[:]) if not isinstance(a, np.ndarray) else a
                        for a in reader.arrays())
        ids_chunks.append(_list_column(pa, tokens, reader.offsets))
        npmi_chunks.append(_list_column(pa, npmi, reader.offsets))
    table = pa.table({"input_ids": pa.chunked_array(ids_chunks),
                      "npmi": pa.chunked_array(npmi_chunks)})
    info = datasets.DatasetInfo(description=f"cmgems dataset {directory} ({split}): k-mer ids "
                                f"(k={manifest.k}) and their NPMI, one row per sample")
    return datasets.Dataset(datasets.table.InMemoryTable(table), info=info,
                            split=datasets.NamedSplit(split))


def _task_files(path: Path) -> dict[str, Path]:
    if path.is_file():
        return {"train": path}
    if not path.is_dir():
        raise InputError(f"{path}: no such task file or folder")
    found = {split: f for split in TASK_SPLITS if (f := task_file(path, split)) is not None}
    if not found:
        raise InputError(f"{path}: no train/dev/test .csv or .tsv in the folder")
    return found


def task_dataset(task: str | Path, k: int = 6, max_length: int = 512,
                 overflow: str = "truncate"):
    """A task file or folder as a `datasets.DatasetDict` (sequence, label, input_ids)."""
    datasets, pa = _require_datasets()
    if overflow not in OVERFLOW_MODES:
        raise InputError(f"overflow {overflow!r}: choose from {', '.join(OVERFLOW_MODES)}")
    splits = {}
    for split, path in _task_files(Path(task)).items():
        seqs, labels, lines = read_examples(path, k)
        ids, lengths, _ = encode(seqs, k, max_length, overflow, path, lines)
        # encode pads rows to the longest; the rows' own lengths give each example's ids
        flat = ids[np.arange(ids.shape[1]) < lengths[:, None]]
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        table = pa.table({"sequence": pa.array(seqs, pa.string()),
                          "label": pa.array(labels),
                          "input_ids": _list_column(pa, flat.astype(np.int32), offsets)})
        splits[split] = datasets.Dataset(datasets.table.InMemoryTable(table),
                                         split=datasets.NamedSplit(split))
    return datasets.DatasetDict(splits)
