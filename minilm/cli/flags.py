"""Command-line flags generated from the config dataclasses, so the fields are the one list of options.

Each field of a config (minilm/config.py, lora/config.py) becomes one flag, `--batch-size` for
`batch_size`, typed by the field's annotation, with the field's `help` as its help text. Every flag
defaults to None, meaning "not given", so a command can tell the flags a user typed (`given`) from
the preset's or the checkpoint's values they override. A bool field is a pair `--x` / `--no-x`.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

from minilm.config import PRESETS
from minilm.errors import MinilmError


def flag(name: str) -> str:
    """`batch_size` -> `--batch-size`."""
    return "--" + name.replace("_", "-")


def cli_fields(cls, names: tuple[str, ...] | None = None) -> list[dataclasses.Field]:
    """The fields of `cls` that are flags: those named in `names`, or else every field not marked cli=False."""
    if names is not None:
        by_name = {f.name: f for f in dataclasses.fields(cls)}
        return [by_name[name] for name in names]
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def value_type(cls, name: str) -> type:
    """The type a field's value has when given: its annotation, with `X | None` read as X."""
    hint = typing.get_type_hints(cls)[name]
    return next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))


def add_config_flags(parser: argparse.ArgumentParser, cls, title: str, default_note=None, *,
                     names: tuple[str, ...] | None = None) -> None:
    """One flag per field of `cls` (or per field in `names`), in an argument group titled `title`.

    default_note(field) -> the text in the help's closing parentheses (default: "default: VALUE")."""
    group = parser.add_argument_group(title)
    for f in cli_fields(cls, names):
        kind = value_type(cls, f.name)
        note = default_note(f) if default_note else f"default: {f.default}"
        text = f"{f.metadata['help']} ({note})"
        if kind is bool:
            group.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=text)
        elif "choices" in f.metadata:  # a fixed set of values, the one its config validates against
            group.add_argument(flag(f.name), choices=f.metadata["choices"], default=None, help=text)
        else:
            group.add_argument(flag(f.name), type=kind, default=None,
                               metavar=f.metadata.get("metavar", kind.__name__.upper()), help=text)


def given(args: argparse.Namespace, cls, names: tuple[str, ...] | None = None) -> dict:
    """The fields of `cls` (or those in `names`) whose flags were given on the command line."""
    return {f.name: getattr(args, f.name) for f in cli_fields(cls, names) if getattr(args, f.name) is not None}


def preset_note(index: int):
    """A default_note listing each preset's value: index 0 reads the presets' ModelConfig, 1 their TrainConfig."""
    def note(f):
        return ", ".join(f"{name}: {getattr(cfgs[index], f.name)}" for name, cfgs in PRESETS.items())
    return note


def describe_keys(cls) -> str:
    """'key: help; key: help; ...' for every field of `cls`: the keys of a one-string spec such as --lora."""
    return "; ".join(f"{f.name}: {f.metadata['help']}" for f in dataclasses.fields(cls))


def check_unchanged(saved, requested: dict, what: str) -> None:
    """Refuse to --resume a checkpoint with a config field changed; say which flags to drop."""
    changed = {k: (getattr(saved, k), v) for k, v in requested.items() if getattr(saved, k) != v}
    if changed:
        listing = "; ".join(f"{flag(k)} {new} (checkpoint: {old})" for k, (old, new) in changed.items())
        raise MinilmError(f"cannot --resume with a changed {what}: {listing}. Drop these flags to resume "
                          f"as saved, or start a new run in another --out folder")


def refuse_adapter(path, role: str, hint: str) -> None:
    """A model argument (`role`, e.g. BASE) that names a LoRA adapter folder, or the run folder holding one,
    is refused with `hint` (how to pass the adapter instead), before the checkpoint reader calls it incomplete."""
    path = Path(path)
    if (path / "adapter_config.json").is_file() or (
            (path / "adapter" / "adapter_config.json").is_file() and not (path / "checkpoint").exists()):
        raise MinilmError(f"{role} {path} holds a LoRA adapter, not a model; {hint}")
