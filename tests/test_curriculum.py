"""Curricula: fixed strategies, CM-Step's per-block mix, CM-GEMS's perplexity-driven switch."""
from __future__ import annotations

import json

import pytest
import torch

from cmgems.masking.curriculum import make_schedule
from cmgems.errors import InputError
from cmgems.rng import derive_seed, generator


@pytest.mark.parametrize("name", ["random", "genemask", "global"])
def test_fixed_schedule(name):
    s = make_schedule(f"fixed:{name}", max_steps=100)
    assert s.strategies(5, 4, generator(0, 5, 0, "curriculum")) == [name] * 4
    assert (s.stage, s.stage_index, s.first_strategy) == (name, 0, name)
    for step, ppl in [(10, 100.0), (20, 99.9), (30, 99.9)]:
        assert s.observe(step, ppl) is None
    assert s.events == [] and s.stage == name


@pytest.mark.parametrize("kwargs,field", [
    ({"mode": "fixed:bert"}, "mode"), ({"mode": "cm-gems"}, "mode"),
    ({"mode": "cm_gems", "max_steps": 0}, "max_steps"),
    ({"mode": "cm_gems", "threshold": -1.0}, "threshold"),
    ({"mode": "cm_gems", "threshold": "1"}, "threshold"),
    ({"mode": "cm_gems", "patience": 0}, "patience"),
    ({"mode": "cm_gems", "min_steps": -5}, "min_steps"),
])
def test_bad_configuration_names_the_field(kwargs, field):
    kwargs = {"max_steps": 100, **kwargs}
    with pytest.raises(InputError, match=field):
        make_schedule(**kwargs)


def test_cm_step_probability_is_block_over_100():
    s = make_schedule("cm_step", max_steps=1000)
    assert (s.stage, s.first_strategy) == ("cm_step", "random")
    assert s.global_probability(0) == 0.0
    assert s.global_probability(9) == 0.0
    assert s.global_probability(10) == 0.01
    assert s.global_probability(505) == 0.50
    assert s.global_probability(999) == 0.99
    assert s.global_probability(1000) == 0.99  # past the end stays in the last block
    # With max_steps not a multiple of 100, blocks are max_steps / 100 steps long.
    assert make_schedule("cm_step", max_steps=250).global_probability(125) == 0.50


@pytest.mark.parametrize("step,expected", [(0, 0.0), (250, 0.25), (500, 0.5), (990, 0.99)])
def test_cm_step_draws_per_sample(step, expected):
    s = make_schedule("cm_step", max_steps=1000, draw="sample")
    names = s.strategies(step, 20000, generator(3, step, 0, "curriculum"))
    assert set(names) <= {"random", "global"}
    frac = names.count("global") / len(names)
    assert abs(frac - expected) < 0.015, frac
    again = s.strategies(step, 20000, generator(3, step, 0, "curriculum"))
    assert names == again


@pytest.mark.parametrize("step,expected", [(0, 0.0), (250, 0.25), (500, 0.5), (990, 0.99)])
def test_cm_step_draws_per_batch_by_default(step, expected):
    s = make_schedule("cm_step", max_steps=1000)
    assert s.config.draw == "batch"
    batches = [s.strategies(step, 10, generator(3, i, 0, "mask")) for i in range(4000)]
    assert all(len(set(b)) == 1 and len(b) == 10 for b in batches)  # one strategy per batch
    frac = sum(b[0] == "global" for b in batches) / len(batches)
    assert abs(frac - expected) < 0.025, frac
    assert batches[:50] == [s.strategies(step, 10, generator(3, i, 0, "mask")) for i in range(50)]


def test_cm_step_draw_is_validated():
    with pytest.raises(InputError, match="draw"):
        make_schedule("cm_step", max_steps=100, draw="token")


SERIES = [(100, 500.0), (200, 300.0), (300, 200.0), (400, 150.0), (500, 149.5), (600, 120.0),
          (700, 100.0)]


def test_cm_gems_switches_at_the_first_small_drop_and_never_back():
    s = make_schedule("cm_gems", max_steps=1000, threshold=1.0)
    assert (s.stage, s.stage_index, s.first_strategy) == ("genemask", 0, "genemask")
    events = [s.observe(step, ppl) for step, ppl in SERIES]
    assert events[:4] == [None] * 4
    assert events[4] == {"step": 500, "from": "genemask", "to": "global",
                         "perplexity_history": [500.0, 300.0, 200.0, 150.0, 149.5]}
    assert events[5:] == [None, None]  # big drops later: stays global
    assert (s.stage, s.stage_index) == ("global", 1)
    assert s.strategies(800, 3, generator(0, 800, 0, "curriculum")) == ["global"] * 3
    assert s.events == [events[4]]


def test_cm_gems_rise_counts_as_below_threshold():
    s = make_schedule("cm_gems", max_steps=1000, threshold=1.0)
    assert s.observe(100, 50.0) is None
    assert s.observe(200, 52.0)["step"] == 200  # perplexity went up: the drop is negative


def test_cm_gems_ignores_non_finite_perplexity():
    s = make_schedule("cm_gems", max_steps=1000)
    assert s.observe(100, float("inf")) is None
    assert s.observe(200, float("inf")) is None   # inf - inf: no plateau evidence
    assert s.observe(300, float("nan")) is None
    assert s.stage == "genemask"


def test_cm_gems_patience_needs_consecutive_small_drops():
    s = make_schedule("cm_gems", max_steps=1000, threshold=1.0, patience=2)
    series = [(100, 100.0), (200, 99.5), (300, 90.0), (400, 89.8), (500, 89.7)]
    events = [s.observe(step, ppl) for step, ppl in series]
    # 200: one small drop, then 300 resets the count; 400 and 500 are two in a row.
    assert events[:4] == [None] * 4
    assert events[4]["step"] == 500


def test_cm_gems_waits_for_min_steps():
    s = make_schedule("cm_gems", max_steps=1000, threshold=1.0, min_steps=350)
    series = [(100, 100.0), (200, 99.9), (300, 99.8), (400, 99.7)]
    events = [s.observe(step, ppl) for step, ppl in series]
    assert events[:3] == [None] * 3
    assert events[3]["step"] == 400


@pytest.mark.parametrize("cut", range(1, len(SERIES)))
def test_cm_gems_resumes_in_the_right_stage(cut):
    whole = make_schedule("cm_gems", max_steps=1000, patience=1)
    for step, ppl in SERIES:
        whole.observe(step, ppl)
    first = make_schedule("cm_gems", max_steps=1000)
    for step, ppl in SERIES[:cut]:
        first.observe(step, ppl)
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints store it as plain data
    resumed = make_schedule("cm_gems", max_steps=1000)
    resumed.load_state_dict(state)
    assert resumed.stage == first.stage
    for step, ppl in SERIES[cut:]:
        resumed.observe(step, ppl)
    assert resumed.events == whole.events
    assert resumed.stage == "global" and resumed.stage_index == 1


def test_cm_gems_patience_count_survives_a_resume():
    first = make_schedule("cm_gems", max_steps=1000, patience=2)
    first.observe(100, 100.0)
    first.observe(200, 99.9)  # one small drop so far
    resumed = make_schedule("cm_gems", max_steps=1000, patience=2)
    resumed.load_state_dict(first.state_dict())
    assert resumed.observe(300, 99.8)["step"] == 300


def test_load_state_from_another_mode_is_refused():
    s = make_schedule("fixed:random", max_steps=10)
    with pytest.raises(InputError, match="cm_gems"):
        make_schedule("cm_gems", max_steps=10).load_state_dict(s.state_dict())


def test_generators_are_pure_functions_of_their_inputs():
    state = torch.random.get_rng_state()
    a = torch.rand(4, generator=generator(1, 2, 3, "mask"))
    assert torch.equal(a, torch.rand(4, generator=generator(1, 2, 3, "mask")))
    for other in [(2, 2, 3, "mask"), (1, 3, 3, "mask"), (1, 2, 4, "mask"), (1, 2, 3, "curriculum")]:
        assert not torch.equal(a, torch.rand(4, generator=generator(*other)))
    assert 0 <= derive_seed(1, 2, 3, "mask") < 2 ** 63
    assert torch.equal(state, torch.random.get_rng_state())
