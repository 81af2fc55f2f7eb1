"""Options defined once: a config dataclass's fields carry their help text (``option(...)``), and the command
line's flags are generated from them, so every field of :class:`sclora.SCLoRAConfig` and
:class:`sclora.TrainConfig` is reachable from ``sclora init`` / ``train`` / ``finetune`` and the YAML runner
under the same name, checked by the same code (the dataclass's own ``__post_init__``).

A field ``lora_alpha`` becomes ``--lora-alpha VALUE``; values are read as YAML (``2e-4``, ``[q_proj, v_proj]``,
``null``), booleans become ``--flag`` / ``--no-flag``, and a field marked ``repeat=True`` takes one value per
knowledge set (``--beta 0.4 --beta 0.4``)."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, field, fields

__all__ = ["add_flags", "flag_values", "option"]


#: a single --target-modules value with one of these is a regex (PEFT's rule for a string), else a module name
REGEX_CHARACTERS = ".*+?[](){}|^$\\"


def option(default=MISSING, help: str = "", *, default_factory=MISSING, choices=None, aliases=(),
           repeat: bool = False, names: bool = False, flag: bool = True):
    """A dataclass field with its command-line help: ``aliases`` are further flag names, ``choices`` are listed
    in the help, ``repeat`` takes the flag once per knowledge set, ``names`` takes module names (a list, or
    one regex), ``flag=False`` keeps it off the command line."""
    meta = {"help": help, "choices": choices, "aliases": tuple(aliases), "repeat": repeat, "names": names,
            "flag": flag}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def _yaml(text: str):
    import yaml

    from .fileio import parse_yaml

    try:
        return parse_yaml(text)
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid value ({err})") from None


def _default(f):
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None


def add_flags(parser: argparse.ArgumentParser, cls, *, skip=(), title: str | None = None) -> None:
    """Add a flag for every field of the dataclass ``cls`` (but ``skip``) to ``parser``; each defaults to unset
    (None), so :func:`flag_values` returns only what was given and the dataclass fills in its own defaults."""
    group = parser.add_argument_group(title or f"{cls.__name__} options")
    for f in fields(cls):
        meta = f.metadata
        if f.name in skip or not meta.get("flag", True):
            continue
        names = [f"--{f.name.replace('_', '-')}", *meta.get("aliases", ())]
        help_text = meta.get("help", "")
        if meta.get("choices"):
            help_text += f" One of: {', '.join(map(str, meta['choices']))}."
        help_text += f" (default: {_default(f)!r})"
        help_text = help_text.replace("%", "%%")
        if meta.get("names"):  # module names: a list, or one regex
            group.add_argument(*names, dest=f.name, type=str, nargs="+", default=None, metavar="NAME",
                               help=help_text)
        elif f.type in ("bool", bool):
            group.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif meta.get("repeat"):
            group.add_argument(*names, dest=f.name, type=_yaml, action="append", default=None, metavar="VALUE",
                               help=help_text + " Repeat it, one per knowledge set (--preserve), for several.")
        else:
            group.add_argument(*names, dest=f.name, type=_yaml, default=None, metavar="VALUE", help=help_text)


def flag_values(args: argparse.Namespace, cls, *, skip=()) -> dict:
    """The fields of ``cls`` given on the command line: repeated flags given once become one value, given n
    times a list of n."""
    values = {}
    for f in fields(cls):
        value = getattr(args, f.name, None)
        if f.name in skip or value is None:
            continue
        if f.metadata.get("repeat") and isinstance(value, list) and len(value) == 1:
            value = value[0]
        if f.metadata.get("names"):
            if value == ["all-linear"]:
                continue  # the default
            if len(value) == 1 and set(value[0]) & set(REGEX_CHARACTERS):
                value = value[0]
        values[f.name] = value
    return values
