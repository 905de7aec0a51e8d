"""Settings written once: a dataclass field carries its default and its help text, and the command
line is made from it (:func:`add_options`) and read back into it (:func:`from_options`).

A field becomes ``--field-name`` when it is declared with :func:`option`; its type comes from the
annotation (``X | None`` takes an X, a ``Literal`` gives the choices, which :func:`check_choices`
also checks in ``__post_init__``, ``tuple[X, ...]`` takes one or more), a bool is a switch.
Metadata ``flag`` renames the option (``--flat`` for ``reparameterize=True``: the switch that
stores the opposite of a True default).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing


def option(default, help: str, **meta):
    """A dataclass field with a command-line option (see the module doc)."""
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def flag_of(f: dataclasses.Field) -> str:
    """The command-line option of an :func:`option` field: ``--field-name``, or its metadata ``flag``."""
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def add_options(parser, cls, names=None) -> None:
    """Add an option to ``parser`` (or an argument group) for every :func:`option` field of ``cls``
    (those in ``names`` only, when given)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata or (names is not None and f.name not in names):
            continue
        flag = flag_of(f)
        kw = dict(dest=f.name, help=f.metadata["help"].replace("%", "%%"))
        if "flag" in f.metadata:
            kw["metavar"] = f.name.upper()
        kind = hints[f.name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if kind is bool:
            # a switch; one that turns a True default off shows no default (it would read "True")
            kw.update(action="store_false" if f.default else "store_true",
                      default=argparse.SUPPRESS if f.default else False)
            kw.pop("metavar", None)
        elif typing.get_origin(kind) is tuple:
            kw.update(nargs="+", type=typing.get_args(kind)[0], default=list(f.default))
        elif typing.get_origin(kind) is typing.Literal:
            kw.update(choices=list(typing.get_args(kind)), default=f.default)
        else:
            kw.update(type=kind, default=f.default)
        parser.add_argument(flag, **kw)


def check_choices(obj) -> None:
    """Raise ValueError naming the field when a ``Literal`` field of dataclass ``obj`` holds another value."""
    for name, kind in typing.get_type_hints(type(obj)).items():
        if typing.get_origin(kind) is typing.Literal and getattr(obj, name) not in typing.get_args(kind):
            allowed = " or ".join(repr(a) for a in typing.get_args(kind))
            raise ValueError(f"{type(obj).__name__}.{name} must be {allowed}, got {getattr(obj, name)!r}")


def check_bounds(obj, at_least: dict[str, float] | None = None, positive: tuple[str, ...] = ()) -> None:
    """Raise ValueError naming the field (and its option) when a number of dataclass ``obj`` is below its
    bound in ``at_least``, or one of ``positive`` is not a finite number above 0; None passes (unset)."""
    flags = {f.name: flag_of(f) for f in dataclasses.fields(obj) if "help" in f.metadata}

    def refuse(name, expected):
        flag = f" ({flags[name]})" if name in flags else ""
        raise ValueError(f"{type(obj).__name__}.{name} must be {expected}, got {getattr(obj, name)}{flag}")

    for name, low in (at_least or {}).items():
        if getattr(obj, name) is not None and not getattr(obj, name) >= low:
            refuse(name, f">= {low}")
    for name in positive:
        value = getattr(obj, name)
        if value is not None and not (value > 0 and math.isfinite(value)):
            refuse(name, "a positive number")


def from_options(cls, args: argparse.Namespace, **fields):
    """``cls`` with the values of its :func:`add_options` options in ``args`` (those absent: the
    field's default), and ``fields`` given here."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
              if "help" in f.metadata and hasattr(args, f.name)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**{**values, **fields})
