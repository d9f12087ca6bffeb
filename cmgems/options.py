"""Configs as dataclasses, and the one way they meet a command line or a config file.

Every config (cmgems.config.PretrainConfig, cmgems.finetune.FinetuneConfig,
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
           choices: tuple | None = None, cli: bool = True):
    """A config field: its default, its --help text, and
    resume: the field shapes what a run computes, so a resume must keep the checkpoint's value;
    flag: the command-line spelling when it is not --field-name; choices: allowed values;
    cli: False keeps the field off the command line (set by code or tests only)."""
    return field(default=default, metadata={"help": help, "resume": resume, "flag": flag,
                                            "choices": choices, "cli": cli})



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
_PARSE = {tuple: _comma_list, int: parse_int, float: parse_float}


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
                               metavar=None if choices else typ.__name__.upper())
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
    """Type-check a value from YAML/JSON (strict: 3 for a float is fine, '3' for an int is not)."""
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is tuple and isinstance(value, list):  # YAML and JSON spell a tuple as a list
        return tuple(value)
    if typ is bool and not isinstance(value, bool) or not isinstance(value, typ):
        raise InputError(f"{where}: field {name!r} must be {typ.__name__}, "
                         f"got {type(value).__name__} {value!r}")
    return value


def load_file(path: str | Path, cls) -> dict[str, Any]:
    """The fields of a YAML or JSON config file, type-checked against dataclass `cls`."""
    typed = field_types(cls)
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise InputError(f"{path}: cannot read config ({e.strerror})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        reason = " ".join(str(e).split())  # YAML's message spans lines; an error is one line
        raise InputError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} "
                         f"({reason})") from None
    data = data or {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: a config is a mapping of field: value, got "
                         f"{type(data).__name__}")
    unknown = sorted(set(data) - set(typed))
    if unknown:
        raise InputError(f"{path}: unknown config field(s) {unknown}; see --help for the fields")
    return {k: _coerce(k, typed[k], v, str(path)) for k, v in data.items()}
