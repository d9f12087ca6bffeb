"""PretrainConfig and the option machinery: every numeric field validated where it is declared,
config files read strictly (duplicate keys, encodings), numbers parsed strictly."""
from __future__ import annotations

import argparse
import dataclasses
import math

import pytest

from cmgems import options
from cmgems.pretrain.config import PretrainConfig, from_sources
from cmgems.errors import InputError
from cmgems.options import check_fields, load_file, option

NUMERIC = [f.name for f in dataclasses.fields(PretrainConfig)
           if options.field_types(PretrainConfig)[f.name] in (int, float)]


def _refused(**kw) -> str:
    with pytest.raises(InputError) as e:
        PretrainConfig(**kw)
    return str(e.value)


def test_defaults_are_valid():
    assert check_fields(PretrainConfig()) == []


def test_every_numeric_field_declares_a_range():
    """A new number without bounds would slip past validation: declare low/high for it."""
    fields = {f.name: f for f in dataclasses.fields(PretrainConfig)}
    unbounded = [n for n in NUMERIC if fields[n].metadata.get("low") is None
                 and fields[n].metadata.get("high") is None]
    assert not unbounded, unbounded


@pytest.mark.parametrize("name", [n for n in NUMERIC
                                  if options.field_types(PretrainConfig)[n] is float])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_refused(name, value):
    assert f"{name} must be a finite number, got {value}" in _refused(**{name: value})


@pytest.mark.parametrize("kw,message", [
    ({"lr": 0.0}, "lr must be > 0, got 0.0"),
    ({"lr": -1e-4}, "lr must be > 0, got -0.0001"),
    ({"beta1": 1.0}, "beta1 must be in [0, 1), got 1.0"),
    ({"beta2": -0.5}, "beta2 must be in [0, 1), got -0.5"),
    ({"eps": 0.0}, "eps must be > 0, got 0.0"),
    ({"weight_decay": -0.01}, "weight_decay must be >= 0, got -0.01"),
    ({"threshold": -1.0}, "threshold must be >= 0, got -1.0"),
    ({"grad_clip": -1.0}, "grad_clip must be >= 0, got -1.0"),
    ({"p_random": 1.5}, "p_random must be in (0, 1), got 1.5"),
    ({"p_global": 0.0}, "p_global must be in (0, 1), got 0.0"),
    ({"min_scored_fraction": 1.5}, "min_scored_fraction must be in [0, 1], got 1.5"),
    ({"max_steps": 0}, "max_steps must be in [1, 1000000000], got 0"),
    ({"max_steps": 10**30}, "max_steps must be in [1, 1000000000]"),
    ({"micro_batch_size": 0}, "micro_batch_size must be in [1, 65536], got 0"),
    ({"max_length": 4}, "max_length must be in [8, 512], got 4"),
    ({"seed": -1}, "seed must be in [0, 4294967295], got -1"),
    ({"seed": 2**64}, "seed must be in [0, 4294967295], got 18446744073709551616"),
    ({"zero_stage": 5}, "zero_stage must be in [0, 3], got 5"),
    ({"export_interval": -1}, "export_interval must be in [0, 1000000000], got -1"),
    ({"precision": "fp8"}, "precision must be one of ('auto', 'fp32', 'bf16', 'fp16'), got 'fp8'"),
    ({"cm_step_draw": "token"}, "cm_step_draw must be one of ('batch', 'sample')"),
    ({"lr": "1e-4"}, "lr must be a number, got '1e-4'"),
    ({"max_steps": 2.5}, "max_steps must be an integer, got 2.5"),
    ({"max_steps": True}, "max_steps must be an integer, got True"),
])
def test_out_of_range_values_are_refused_with_the_field_and_value(kw, message):
    assert message in _refused(**kw)


def test_all_errors_are_reported_at_once():
    text = _refused(lr=0.0, beta1=1.0, seed=-1)
    assert "lr must" in text and "beta1 must" in text and "seed must" in text


def test_bounds_are_inclusive_unless_open():
    PretrainConfig(beta1=0.0, weight_decay=0.0, threshold=0.0, max_length=512,
                   seed=2**32 - 1, min_scored_fraction=0.0, export_interval=0)


def test_option_rejects_an_unknown_open_side():
    with pytest.raises(ValueError):
        option(1.0, "x", low=0, open="left")


# ---------------------------------------------------------------------- config files
def test_yaml_float_written_without_a_dot_is_accepted(tmp_path):
    """PyYAML (YAML 1.1) reads `1e-4` as a string; a float field takes it as the number."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 1e-4\neps: 1E-6\nthreshold: '2.5'\nmax_steps: 017\n")
    assert load_file(cfg, PretrainConfig) == {"lr": 1e-4, "eps": 1e-6, "threshold": 2.5,
                                              "max_steps": 17}  # decimal, not YAML 1.1 octal


@pytest.mark.parametrize("body,message", [
    ("lr: fast\n", "field 'lr' must be float, got str 'fast'"),
    ("lr: 0_5\n", "field 'lr' must be float, got str '0_5'"),      # YAML 1.1: the int 5
    ("max_steps: 1:30\n", "field 'max_steps' must be int, got str '1:30'"),  # not 90
    ("lr: .nan\n", "lr must be a finite number"),
    ("max_steps: '10'\n", "field 'max_steps' must be int, got str '10'"),
    ("max_steps: true\n", "field 'max_steps' must be int, got bool True"),
])
def test_yaml_values_that_are_not_numbers_are_refused(tmp_path, body, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(body)
    with pytest.raises(InputError, match=r"c\.yaml") as e:
        from_sources(str(cfg), _parse([]))
    assert message in str(e.value)


def test_duplicate_yaml_key_is_refused_with_both_lines(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_steps: 10\nlr: 0.001\nlr: 0.01\n")
    with pytest.raises(InputError) as e:
        load_file(cfg, PretrainConfig)
    assert str(e.value) == f"{cfg}:3: key 'lr' given twice (lines 2 and 3); keep one"


def test_duplicate_json_key_is_refused(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text('{"lr": 0.001, "lr": 0.01}')
    with pytest.raises(InputError, match=r"c\.json: not valid JSON \(key\(s\) \['lr'\] given"):
        load_file(cfg, PretrainConfig)


def test_non_utf8_config_names_line_and_byte(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"max_steps: 10\n# caf\xe9\nlr: 0.001\n")
    with pytest.raises(InputError) as e:
        load_file(cfg, PretrainConfig)
    assert str(e.value) == (f"{cfg}:2: not UTF-8 text (byte 0xe9 at offset 19); save the config "
                            f"as UTF-8")


# ---------------------------------------------------------------------- the command line
def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    options.add_arguments(p, PretrainConfig)
    return p.parse_args(argv)


@pytest.mark.parametrize("argv", [["--lr", "0_5"], ["--lr", "nan"], ["--lr", "inf"],
                                  ["--max-steps", "1_000"], ["--max-steps", "0x10"],
                                  ["--seed", "1e3"]])
def test_options_parse_strict_decimals(argv, capsys):
    with pytest.raises(SystemExit) as e:
        _parse(argv)
    assert e.value.code == 2
    assert "invalid" in capsys.readouterr().err


def test_huge_seed_from_the_command_line_is_a_range_error():
    args = _parse(["--seed", "9" * 40])
    with pytest.raises(InputError, match=r"command line: invalid config: seed must be in "
                                         r"\[0, 4294967295\], got 9999"):
        from_sources(None, args)


def test_refused_file_value_names_the_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("beta2: 1.0\n")
    with pytest.raises(InputError, match=rf"{cfg}: invalid config: beta2 must be in \[0, 1\)"):
        from_sources(str(cfg), _parse([]))


# ---------------------------------------------------------------------- the presets
PAPER = {"mode": "cm_gems", "max_steps": 10_000, "max_length": 512, "micro_batch_size": 10,
         "grad_accum": 25, "lr": 8e-4, "beta1": 0.9, "beta2": 0.98, "eps": 1e-6,
         "weight_decay": 0.01, "warmup_steps": 500, "grad_clip": 1.0, "threshold": 1.0,
         "patience": 1, "export_interval": 1000, "save_interval": 1000, "seed": 42,
         "data_dir": "data/grch38", "cm_step_draw": "batch"}


@pytest.mark.parametrize("preset,model", [("paper.yaml", "dnabert"), ("paper-logo.yaml", "logo")])
def test_paper_presets_hold_the_published_protocol(preset, model):
    from conftest import ROOT
    path = ROOT / "launchers" / "configs" / preset
    cfg = from_sources(str(path), _parse([]))
    assert cfg.model == model
    for name, value in PAPER.items():
        assert getattr(cfg, name) == value, name
    assert cfg.micro_batch_size * cfg.grad_accum == 250
    # a 1K model must be able to switch before its last step: decisions at 200, 300, ... < 1000
    assert cfg.eval_interval * 2 < 1000 and 1000 % cfg.eval_interval == 0
    assert cfg.export_interval == 1000 and cfg.max_steps % cfg.export_interval == 0
    assert "--valid-fraction 0.1" in path.read_text()   # how the dataset is built
