"""Configs as dataclasses, and the one way they meet a command line or a config file.

Every config (cmgems.pretrain.config.PretrainConfig, cmgems.evaluation.finetune.FinetuneConfig,
preprocessing.build.BuildConfig) declares its fields with `option`: default, help text, and whether
the field decides a run's outcome (`resume=True`: a resumed run must use the checkpoint's value).
`add_arguments(parser, Cls)` makes one --option per field with that help; `from_args(Cls, args,
base)` builds the config from defaults <- base <- the options given; `load_file(path, Cls)` reads
and type-checks a YAML or JSON file of fields. Validation lives in each config's __post_init__.
This module imports neither torch nor transformers: preprocessing uses it too.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any

import yaml

from cmgems.errors import InputError

# The default seed of every config (pretraining, the dataset build, finetuning, GUE, comparisons):
# 42, as in DNABERT's and DNABERT-2's scripts, which GeneMask's runs follow, and in transformers'
# TrainingArguments. One number, so a run whose seeds are all left at their defaults is one seed.
DEFAULT_SEED = 42


def option(default, help: str, *, resume: bool = False, flag: str | None = None,
           choices: tuple | None = None, cli: bool = True, low: float | None = None,
           high: float | None = None, open: str = ""):
    """A config field: its default, its --help text, and
    resume: the field shapes what a run computes, so a resume must keep the checkpoint's value;
    flag: the command-line spelling when it is not --field-name; choices: allowed values;
    cli: False keeps the field off the command line (set by code or tests only);
    low, high: the allowed range of a number (either may be None: unbounded on that side);
    open: "low", "high" or "both": which of those bounds is itself excluded.
    check_fields() checks ranges and choices, and that every float is finite."""
    if open not in ("", "low", "high", "both"):
        raise ValueError(f"open must be '', 'low', 'high' or 'both', got {open!r}")
    return field(default=default, metadata={"help": help, "resume": resume, "flag": flag,
                                            "choices": choices, "cli": cli, "low": low,
                                            "high": high, "open": open})


def _range_text(low, high, open: str) -> str:
    """'> 0', '>= 1', '<= 512', 'in (0, 1)', 'in [0, 1)': the form of every range message."""
    lo_open, hi_open = open in ("low", "both"), open in ("high", "both")
    if high is None:
        return f"{'>' if lo_open else '>='} {low}"
    if low is None:
        return f"{'<' if hi_open else '<='} {high}"
    return f"in {'(' if lo_open else '['}{low}, {high}{')' if hi_open else ']'}"


def _field_error(name: str, typ: type, value, meta) -> str | None:
    """Why `value` is not allowed for the field, or None."""
    if value is None:
        return None
    choices = meta.get("choices")
    if choices and value not in choices:
        return f"{name} must be one of {tuple(choices)}, got {value!r}"
    if typ not in (int, float):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (typ is int and not isinstance(value, int)):
        return f"{name} must be {'an integer' if typ is int else 'a number'}, got {value!r}"
    if typ is float and not math.isfinite(value):
        return f"{name} must be a finite number, got {value}"
    low, high, open = meta.get("low"), meta.get("high"), meta.get("open", "")
    if low is None and high is None:
        return None
    below = low is not None and (value <= low if open in ("low", "both") else value < low)
    above = high is not None and (value >= high if open in ("high", "both") else value > high)
    if below or above:
        return f"{name} must be {_range_text(low, high, open)}, got {value}"
    return None


def check_fields(obj) -> list[str]:
    """Every declared constraint a dataclass instance breaks (ranges, choices, finiteness), one
    message per field in declaration order: `lr must be > 0, got 0.0`. For __post_init__."""
    typed = field_types(type(obj))
    errors = []
    for f in dataclasses.fields(obj):
        err = _field_error(f.name, typed[f.name], getattr(obj, f.name), f.metadata)
        if err:
            errors.append(err)
    return errors


def _base_type(hint) -> type:
    """int for `int` and `int | None`; tuple for `tuple[str, ...]`; the class otherwise."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else hint
    return origin or hint


def field_types(cls) -> dict[str, type]:
    """{field name: the type its values are checked and parsed as} of dataclass `cls`."""
    hints = typing.get_type_hints(cls)
    return {f.name: _base_type(hints[f.name]) for f in dataclasses.fields(cls)}


def resume_fields(cls) -> tuple[str, ...]:
    """Fields a resumed run must take unchanged from its checkpoint."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("resume"))


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def parse_int(text: str) -> int:
    """A decimal integer, nothing else: '1_000' or '0x10' is a typo here, not a number."""
    if not _INT.fullmatch(text.strip()):
        raise ValueError(f"not an integer: {text!r}")
    return int(text)


def parse_float(text: str) -> float:
    """A finite decimal number ('1e-4', '.5', '3'): '0_5', 'nan' and 'inf' are refused."""
    if not _FLOAT.fullmatch(text.strip()):
        raise ValueError(f"not a finite decimal number: {text!r}")
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"not a finite number: {text!r}")
    return value


parse_int.__name__, parse_float.__name__ = "int", "float"  # argparse names the type in errors
def parse_int_or_word(text: str) -> int | str:
    """An `int | str` field's value: a decimal integer, else the word as written (the field's
    own check says which words it takes)."""
    try:
        return parse_int(text)
    except ValueError:
        return text.strip()


parse_int_or_word.__name__ = "int_or_word"
_PARSE = {tuple: _comma_list, int: parse_int, float: parse_float, int | str: parse_int_or_word}


def _type_name(typ) -> str:
    """'int', 'float'; 'int | str' for a union."""
    return getattr(typ, "__name__", None) or str(typ)


def add_arguments(parser: argparse.ArgumentParser, cls, *, title: str | None = None,
                  defaults: dict[str, Any] | None = None, skip: tuple[str, ...] = (),
                  only: tuple[str, ...] | None = None, prefix: str = ""):
    """One --option per field of dataclass `cls`, its help taken from the field's metadata; returns
    the argument group (a launcher may add an alias to it).

    Options default to None (not given), so from_args can tell an option from a default;
    `defaults` only changes the default shown in the help (e.g. a default config file's values).
    A field whose default is None (not set, or set from other fields) shows no default: its help
    says what then. `only` limits the options to those fields. `prefix` ("finetune-") puts a
    second config on the same command line: --finetune-lr, read back by
    from_args(cls, args, prefix="finetune-").
    """
    group = parser.add_argument_group(title or f"{cls.__name__} fields")
    typed = field_types(cls)
    for f in dataclasses.fields(cls):
        if (f.name in skip or (only is not None and f.name not in only)
                or not f.metadata.get("cli", True) or "help" not in f.metadata):
            continue
        flag = "--" + prefix + (f.metadata.get("flag") or "--" + f.name.replace("_", "-"))[2:]
        dest = _dest(prefix, f.name)
        typ = typed[f.name]
        shown = (defaults or {}).get(f.name, f.default)
        if isinstance(shown, tuple):
            shown = ",".join(shown)
        # argparse %-formats help texts: a literal % must reach it doubled.
        help_text = (f.metadata["help"] + ("" if shown is None else f" (default: {shown!r})")
                     ).replace("%", "%%")
        if typ is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction,
                               default=None, help=help_text)
        else:
            choices = f.metadata.get("choices")
            group.add_argument(flag, dest=dest, type=_PARSE.get(typ, typ), default=None,
                               choices=choices, help=help_text,
                               metavar=None if choices else _type_name(typ).upper())
    return group


def _dest(prefix: str, name: str) -> str:
    return prefix.replace("-", "_") + name


def given_options(cls, args: argparse.Namespace, prefix: str = "") -> dict[str, Any]:
    """The fields of `cls` given on the command line (add_arguments' options that are not None)."""
    values = vars(args)
    return {f.name: values[_dest(prefix, f.name)] for f in dataclasses.fields(cls)
            if values.get(_dest(prefix, f.name)) is not None}


def from_args(cls, args: argparse.Namespace, base: dict[str, Any] | None = None,
              prefix: str = ""):
    """cls(defaults <- base <- the options given on the command line)."""
    return cls(**{**(base or {}), **given_options(cls, args, prefix)})


def _coerce(name: str, typ: type, value: Any, where: str):
    """Type-check a value from YAML/JSON (strict: 3 for a float is fine, '3' for an int is not).

    A float field also takes a decimal string: YAML 1.1 (PyYAML) reads `lr: 1e-4` as the string
    '1e-4' (its floats need a dot), and refusing what every user writes helps nobody."""
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):
        try:
            return parse_float(value)
        except ValueError:
            pass
    if typ is tuple and isinstance(value, list):  # YAML and JSON spell a tuple as a list
        return tuple(value)
    if typ is bool and not isinstance(value, bool) or not isinstance(value, typ) or \
            typ is int and isinstance(value, bool):
        raise InputError(f"{where}: field {name!r} must be {_type_name(typ)}, "
                         f"got {type(value).__name__} {value!r}")
    return value


class _DuplicateKey(Exception):
    def __init__(self, key, first: int, second: int):
        super().__init__(f"key {key!r} given twice (lines {first} and {second}); keep one")
        self.line = second


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (PyYAML keeps the last silently:
    a config whose second `lr:` overrides the first is a typo nobody sees), and reads numbers
    as YAML 1.2 does: plain decimals only. YAML 1.1 reads `0_5` as 5, `0o17`/`017` as octal and
    `1:30` as 90; here they stay strings, which a number field refuses."""

    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers
                if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(key, seen[key] + 1, key_node.start_mark.line + 1)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(  # decimal: PyYAML's would read 017 as octal 15
    "tag:yaml.org,2002:int", lambda loader, node: int(loader.construct_scalar(node), 10))
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _unique_pairs(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ValueError(f"key(s) {twice} given twice")
    return dict(pairs)


def load_file(path: str | Path, cls) -> dict[str, Any]:
    """The fields of a YAML or JSON config file, type-checked against dataclass `cls`."""
    typed = field_types(cls)
    path = Path(path)
    kind = "JSON" if path.suffix == ".json" else "YAML"
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read config ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                         f"{e.start}); save the config as UTF-8") from None
    try:
        data = json.loads(text, object_pairs_hook=_unique_pairs) if kind == "JSON" else \
            yaml.load(text, Loader=_UniqueKeyLoader)
    except _DuplicateKey as e:
        raise InputError(f"{path}:{e.line}: {e}") from None
    except (ValueError, yaml.YAMLError) as e:
        reason = " ".join(str(e).split())  # YAML's message spans lines; an error is one line
        raise InputError(f"{path}: not valid {kind} ({reason})") from None
    if data is None:  # a run on the built-in defaults is not what a user naming a file expects
        raise InputError(f"{path}: holds no config fields (it is empty or only comments); set "
                         f"the fields it should, or leave the file out to take the defaults")
    if not isinstance(data, dict):
        raise InputError(f"{path}: a config is a mapping of field: value, got "
                         f"{type(data).__name__}")
    unknown = sorted(set(map(str, data)) - set(typed))
    if unknown:
        raise InputError(f"{path}: unknown config field(s) {unknown}; see --help for the fields")
    return {k: _coerce(k, typed[k], v, str(path)) for k, v in data.items()}
