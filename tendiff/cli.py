"""Command lines from config dataclasses: each field is defined once (name, type, default, help)
and becomes one option. A field's ``metadata`` may hold ``help``, ``choices`` and ``flag`` (the
option's name when it should differ from ``--field-name``)."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any


def field(default: Any = dataclasses.MISSING, help: str = "", choices=None, flag: str | None = None,
          type: type | None = None, default_factory: Any = dataclasses.MISSING):
    """A dataclass field that knows its command-line help (``type``: for a None default)."""
    metadata = {"help": help, "choices": choices, "flag": flag, "type": type}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def add_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One option per field of the dataclass ``cls`` (positional when the field has no default)."""
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("help") is None:
            continue
        meta = f.metadata
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        name = meta.get("flag") or "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"help": meta.get("help") or None}
        if default is dataclasses.MISSING:  # required: an option when it has a flag, else positional
            if meta.get("flag"):
                parser.add_argument(name, dest=f.name, required=True, choices=meta.get("choices"), **kwargs)
            else:
                parser.add_argument(f.name, choices=meta.get("choices"), **kwargs)
            continue
        kwargs["dest"] = f.name
        if isinstance(default, bool):
            parser.add_argument(name, action="store_false" if default else "store_true", **kwargs)
            continue
        if isinstance(default, tuple):
            kwargs.update(nargs="+", type=_element_type(f, default))
        elif default is not None:
            kwargs["type"] = type(default)
        elif meta.get("type"):
            kwargs["type"] = meta["type"]
        parser.add_argument(name, default=default, choices=meta.get("choices"), **kwargs)


def from_args(cls, args: argparse.Namespace, **overrides):
    """An instance of ``cls`` from the parsed options (tuples for list options), with ``overrides``."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**{**values, **overrides})


def _element_type(f, default: tuple):
    return type(default[0]) if default else str
