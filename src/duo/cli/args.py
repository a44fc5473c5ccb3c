"""Typed dataclass configs as command-line flags, help built from the field docs."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

MISSING = dataclasses.MISSING


def _base_type(tp):
    """int | None → int; list[str] | None → (str, list)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0], True
    return tp, False


def add_dataclass_flags(
    parser: argparse.ArgumentParser,
    cls,
    positional: tuple[str, ...] = (),
    suppress_defaults: bool = False,
    skip: tuple[str, ...] = (),
) -> None:
    """One flag per field. With suppress_defaults, only flags the user typed reach the namespace."""
    hints = typing.get_type_hints(cls)
    # keyword-only fields (shared flags from a base class) after the command's own, as `--help` reads best
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.kw_only is True):
        if f.name in skip:
            continue
        tp, is_list = _base_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not MISSING else None
        if f.default_factory is not MISSING:
            default = f.default_factory()
        kwargs: dict = {"help": help_text}
        kwargs["default"] = argparse.SUPPRESS if suppress_defaults else default
        if default is not None and help_text:
            kwargs["help"] = f"{help_text} (default: {default})"
        flag = "--" + f.name.replace("_", "-")
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        kwargs["type"] = tp
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
            if f.name not in positional:  # the metavar hides argparse's own list of choices
                kwargs["help"] += f"; one of: {', '.join(map(str, f.metadata['choices']))}"
        if is_list:
            kwargs["nargs"] = "+"
        if f.name in positional:
            parser.add_argument(f.name, **{k: v for k, v in kwargs.items() if k != "default"})
        else:
            required = f.default is MISSING and f.default_factory is MISSING and not suppress_defaults
            parser.add_argument(flag, required=required, metavar=f.name.upper(), **kwargs)


def dataclass_from_args(cls, args: argparse.Namespace, **extra):
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    return cls(**{**values, **extra})


def explicit_values(cls, args: argparse.Namespace) -> dict:
    """Fields the user set (parser built with suppress_defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


def add_command(sub, name: str, cls, run, help: str, description: str, suppress_defaults: bool = False):
    """A sub-command whose flags are the fields of dataclass `cls`; `run(args)` is called with the namespace."""
    parser = sub.add_parser(name, help=help, description=description)
    add_dataclass_flags(parser, cls, suppress_defaults=suppress_defaults)
    parser.set_defaults(func=run)
    return parser
