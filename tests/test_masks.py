"""`cmgems masks`: the positions each masking selects on a real dataset's samples, as printed
(--json), drawn (--png) and logged by pretraining; run as a subprocess like a user runs it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import ROOT, run_module
from cmgems.data.layout import DatasetDir
from cmgems.data.loader import SampleDataset
from cmgems.data.npmi_table import load_table
from cmgems.data.shards import ShardSet
from cmgems.masking.maskings import kspan, select
from cmgems.masking.view import selections, spans
from cmgems.rng import generator

MASKS = str(ROOT / "launchers" / "masks.py")


def masks(*args, check=True):
    return run_module(MASKS, *args, check=check)


def test_json_lines_are_the_selection_of_the_masking_itself(tiny_dataset):
    res = masks("--data-dir", str(tiny_dataset), "--strategy", "random", "global",
                "--samples", "3", "--max-length", "128", "--seed", "5", "--json")
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [(r["strategy"], r["sample"]) for r in rows] == \
        [("random", 0), ("random", 1), ("random", 2), ("global", 0), ("global", 1), ("global", 2)]
    # the same samples, cut and framed as training frames them, through the masking directly
    shards = ShardSet(tiny_dataset, "valid")
    batch = SampleDataset(shards, 128).batch(np.arange(3))
    table = torch.from_numpy(load_table(DatasetDir(tiny_dataset).npmi_table, 6))
    for strategy in ("random", "global"):
        want = select(strategy, batch["input_ids"], batch["npmi"], batch["attention_mask"],
                      generator(5, 0, 0, f"masks-{strategy}"), k=6, npmi_table=table)
        for r in (r for r in rows if r["strategy"] == strategy):
            i = r["sample"]
            assert r["length"] == int(batch["attention_mask"][i].sum()) <= 128
            assert r["selected"] == torch.nonzero(want[i]).flatten().tolist()
            assert 0 not in r["selected"]                    # [CLS] is never selected
            assert r["length"] - 1 not in r["selected"]     # nor [SEP]
    assert all(any(r["selected"] for r in rows if r["strategy"] == s) for s in ("random", "global"))
    # the same seed gives the same picks; another seed other random ones, the same global ones
    again = masks("--data-dir", str(tiny_dataset), "--strategy", "random", "global",
                  "--samples", "3", "--max-length", "128", "--seed", "6", "--json")
    other = [json.loads(line) for line in again.stdout.splitlines()]
    assert [r["selected"] for r in other[3:]] == [r["selected"] for r in rows[3:]]
    assert [r["selected"] for r in other[:3]] != [r["selected"] for r in rows[:3]]


def test_position_lookup_selects_the_same_positions_in_every_sample_of_a_length(tiny_dataset):
    """The authors' content-independent reading: global's choice depends on the length only."""
    found = selections(tiny_dataset, ["global"], samples=6, max_length=64,
                       pmi_lookup="position")
    by_length = {}
    for s in found:
        by_length.setdefault(s.length, []).append(s.selected)
    same_length = [picks for picks in by_length.values() if len(picks) > 1]
    assert same_length, "the first samples are all cut to 64 tokens"
    for picks in same_length:
        assert all(p == picks[0] for p in picks)
    token = selections(tiny_dataset, ["global"], samples=6, max_length=64)
    assert len({tuple(s.selected) for s in token}) > 1  # by content: samples differ


def test_text_output_and_the_picture(tiny_dataset, tmp_path):
    png = tmp_path / "masks.png"
    res = masks("--data-dir", str(tiny_dataset), "--samples", "2", "--max-length", "96",
                "--png", str(png))
    lines = res.stdout.splitlines()
    assert len(lines) == 6  # 3 strategies x 2 samples
    assert lines[0].split()[:3] == ["random", "sample", "0"] and "selected: " in lines[0]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image
    with Image.open(png) as im:
        assert im.size[0] > 300 and im.size[1] > 200
    assert not list(tmp_path.glob(".tmp-*"))


def test_spans_reads_as_runs():
    assert spans([1, 2, 3, 7, 9, 10]) == "1-3, 7, 9-10"
    assert spans([]) == "-"


def test_genemask_spans_are_k_wide_around_each_centre(tiny_dataset):
    left, right = kspan(6)
    (s,) = selections(tiny_dataset, ["genemask"], samples=1, max_length=128)
    runs = [r for r in spans(s.selected).split(", ")]
    widths = [int(b) - int(a) + 1 for a, b in (r.split("-") for r in runs if "-" in r)]
    assert widths and min(widths) >= 1 and max(widths) >= left + right + 1


@pytest.mark.parametrize("args, message", [
    (["--data-dir", "{missing}"], "manifest.json"),
    (["--data-dir", "{data}", "--samples", "0"], "must be >= 1"),
    (["--data-dir", "{data}", "--png", "{missing}/x.png"], "cannot write"),
])
def test_bad_input_exits_2_with_one_line(tiny_dataset, tmp_path, args, message):
    args = [a.format(missing=tmp_path / "nothing", data=tiny_dataset) for a in args]
    res = masks(*args, check=False)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr and "Traceback" not in res.stderr
    assert res.stdout == ""
