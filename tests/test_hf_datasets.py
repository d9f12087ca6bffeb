"""The datasets bridge: a dataset split and a task folder as Hugging Face datasets, row for row
what the trainer and the finetuning read from the same files."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from fewshot_files import shuffled_pool, write_fewshot_tsv

from cmgems.data.shards import ShardSet
from cmgems.errors import InputError
from cmgems.evaluation.tasks import load_task_file
from cmgems.hf_datasets import shard_dataset, task_dataset


@pytest.mark.parametrize("split", ["train", "valid"])
def test_a_split_holds_every_sample_as_the_trainer_reads_it(tiny_dataset, split):
    data = shard_dataset(tiny_dataset, split)
    shards = ShardSet(tiny_dataset, split)
    assert len(data) == len(shards) and data.split == split
    assert data.column_names == ["input_ids", "npmi"]
    data = data.with_format("numpy")
    rng = np.random.default_rng(0)
    for i in [0, len(shards) - 1, *rng.integers(0, len(shards), 20).tolist()]:
        ids, npmi = shards[i]
        np.testing.assert_array_equal(data[i]["input_ids"], ids)
        np.testing.assert_array_equal(data[i]["npmi"], npmi)
    total = sum(len(r) for r in data[:]["input_ids"])
    assert total == int(shards.lengths.sum())  # every token, across shard boundaries


def test_a_split_refuses_what_the_trainer_refuses(tiny_dataset, tmp_path):
    with pytest.raises(InputError, match="no manifest"):
        shard_dataset(tmp_path)
    with pytest.raises(InputError, match="no 'test' shards .splits: train, valid"):
        shard_dataset(tiny_dataset, "test")
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dataset, copy)
    first = json.loads((copy / "manifest.json").read_text())["shards"][0]["path"]
    with open(copy / first, "r+b") as f:  # one byte altered inside the file
        f.seek(-9, 2)
        b = f.read(1)
        f.seek(-9, 2)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(InputError, match="sha256 differs"):
        shard_dataset(copy)


def test_a_task_folder_is_a_datasetdict_with_the_finetuning_ids(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "prom"
    for split, n in (("train", 12), ("dev", 4), ("test", 6)):
        write_fewshot_tsv(folder / f"{split}.tsv", shuffled_pool(rng, [n, n], length=40))
    gue = tmp_path / "gue_task"
    gue.mkdir()
    seqs = ["".join(rng.choice(list("ACGT"), 30 + i)) for i in range(5)]
    (gue / "train.csv").write_text("sequence,label\n" + "".join(f"{s},{i % 2}\n"
                                                               for i, s in enumerate(seqs)))
    (gue / "test.csv").write_text("sequence,label\n" + f"{seqs[0]},1\n")
    for root, splits in ((folder, ["train", "dev", "test"]), (gue, ["train", "test"])):
        data = task_dataset(root, k=6, max_length=20)
        assert list(data) == splits
        for split in splits:
            path = next(root.glob(f"{split}.*"))
            ref = load_task_file(path, 6, 20)
            rows = data[split]
            assert rows["label"] == ref.labels.tolist()
            for i in range(len(ref)):
                assert rows[i]["input_ids"] == ref.input_ids[i, :ref.lengths[i]].tolist()
            assert all(len(r) <= 20 for r in rows["input_ids"])  # cut as finetuning cuts
    assert data["train"]["sequence"] == seqs
    with pytest.raises(InputError, match="line 2: label 'x' is not an integer"):
        (gue / "dev.csv").write_text("sequence,label\nACGTACGTAC,x\n")
        task_dataset(gue)
    with pytest.raises(InputError, match="no train/dev/test"):
        task_dataset(tmp_path)
