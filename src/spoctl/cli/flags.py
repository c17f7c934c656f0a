"""Command-line flags declared once: one `Flag` per option, in a table per command.

A flag names the config key it sets; from that one entry come

- the Typer option (its name, type, metavar, and help: the config field's `description=` unless the flag says
  more), added to the command by `@command(config=..., flags=TABLE)`;
- the value it puts into the configuration (`Flag.to_config`): flags < nothing else, above `--set` and `--config`;
- the flag named in a configuration error about its key (`flag_for`), and the flag column of the generated docs.

To add a flag: one `Flag(...)` line in the command's table (e.g. `ALIGN_FLAGS` in cli/align.py). A flag that sets
no config key (`--debug`) stays an ordinary parameter of the command function.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

from pydantic import BaseModel

from ..errors import UsageError

# value: FLAG VALUE as the key's type. list: FLAG A,B,C. pairs: repeatable FLAG DIM=VALUE -> {DIM: VALUE}.
# on / off: a switch that sets the key to true / false when given. toggle: --x/--no-x, true or false.
Kind = Literal["value", "list", "pairs", "on", "off", "toggle"]


@dataclass(frozen=True)
class Flag:
    key: str  # the config key it sets, relative to the command's section: "learning_rate", "judge.name"
    decls: tuple[str, ...]  # the option strings: ("--lr",), ("--data", "-d"), ("--lora/--full",)
    kind: Kind = "value"
    metavar: str | None = None  # default: from the key's type (INT, FLOAT, PATH, a|b|c, DIM=VALUE)
    help: str | None = None  # default: the config field's description
    note: str = ""  # said after the help (what only the command line needs to know)
    convert: Callable[[Any], Any] | None = None  # value / pairs: raw text -> the config value (pairs: each VALUE)
    check: Callable[[Any], Any] | None = None  # pairs: raises ValueError(reason) for a bad VALUE, named by flag
    example: str = ""  # pairs: a valid DIM=VALUE, shown in errors
    collect: bool = False  # pairs: a DIM given again adds a value (DIM -> [VALUE, ...]) instead of an error
    also: tuple[str, ...] = ()  # further keys it sets: `convert` returns one value per key (key, *also)
    type: Any = None  # the Python type Typer parses (default: the key's; needed when no config model has it)

    @property
    def name(self) -> str:
        """The long option: '--lr'; '--lora/--full' for a toggle (as the user reads it in messages)."""
        longs = [d for part in self.decls for d in part.split("/") if d.startswith("--")]
        return "/".join(longs) if self.kind == "toggle" else longs[0]

    @property
    def param(self) -> str:
        """The Python parameter name Typer gives the option (unique within a command)."""
        return "flag_" + self.name.split("/")[0].lstrip("-").replace("-", "_")

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.key, *self.also)

    def to_config(self, raw: Any) -> dict[str, Any]:
        """Config key -> value for what the user typed (None: the flag was not given)."""
        if raw is None or (self.kind in ("on", "off") and raw is False):
            return {k: None for k in self.keys}
        if self.kind == "on":
            value: Any = True
        elif self.kind == "off":
            value = False
        elif self.kind == "list":
            value = [v.strip() for v in raw.split(",") if v.strip()] or None
        elif self.kind == "pairs":
            value = self._pairs(raw)
        else:
            value = self.convert(raw) if self.convert is not None else (str(raw) if isinstance(raw, Path) else raw)
        if self.also:
            return dict(zip(self.keys, value))
        return {self.key: value}

    def _pairs(self, items: list[str]) -> dict[str, Any] | None:
        if self.collect:  # each DIM once per item; a repeated DIM gathers its values, each value once
            grouped: dict[str, list[Any]] = {}
            for item in items:
                for key, value in (parse_assignments([item], self.name, self.example, self.convert or str)
                                   or {}).items():
                    if value in grouped.get(key, []):
                        raise UsageError(f"{self.name}: dimension '{key}' is given twice with the same source "
                                         f"{value}; give each source once (different ones under one DIM are "
                                         "mixed)")
                    grouped.setdefault(key, []).append(value)
            pairs: dict[str, Any] | None = {k: v[0] if len(v) == 1 else v for k, v in grouped.items()} or None
        else:
            pairs = parse_assignments(items, self.name, self.example, self.convert or str)
        for dim, value in (pairs or {}).items():
            if self.check is not None:
                try:
                    self.check(value)
                except ValueError as err:
                    raise UsageError(f"{self.name} {dim}={value}: {err}, e.g. {self.name} {self.example}") from None
        return pairs

    # ---- the Typer option
    def annotation(self, model: type[BaseModel] | None) -> Any:
        if self.kind in ("on", "off"):
            return bool
        if self.kind == "toggle":
            return Optional[bool]
        if self.kind == "pairs":
            return Optional[list[str]]
        if self.kind == "list" or self.convert is not None:
            return Optional[str]
        base = self.type if self.type is not None else _value_type(field_of(model, self.key).annotation)
        return Optional[base]

    def option(self, model: type[BaseModel] | None) -> Any:
        import typer

        try:
            field = field_of(model, self.key)
        except KeyError:  # a flag of a command without a config model: its help and type are its own
            field = None
        text = self.help if self.help is not None else " ".join((field.description or "").split()) if field else ""
        if self.kind == "pairs" and "repeatable" not in (text + self.note).lower():
            text += " Repeatable."
        text = f"{text} {self.note}".strip()
        metavar = self.metavar if self.kind not in ("on", "off", "toggle") else None
        if metavar is None and self.kind == "list":
            metavar = "A,B,..."
        elif metavar is None and self.kind == "pairs":
            metavar = "DIM=VALUE"
        elif metavar is None and self.kind == "value":
            choices = _choices(field.annotation) if field is not None and self.convert is None else []
            base = _value_type(self.annotation(model))
            metavar = "|".join(choices) if choices else {int: "INT", float: "FLOAT", Path: "PATH"}.get(base, "TEXT")
        default = False if self.kind in ("on", "off") else None
        return typer.Option(default, *self.decls, help=text or None, metavar=metavar)


def field_of(model: type[BaseModel] | None, key: str) -> Any:
    """The pydantic field of a dotted key ('judge.name' -> JudgeSettings.name)."""
    if model is None:
        raise KeyError(key)
    cls: Any = model
    parts = key.split(".")
    for part in parts[:-1]:
        cls = _model_in(cls.model_fields[part].annotation)
    return cls.model_fields[parts[-1]]


def _model_in(annotation: Any) -> type[BaseModel]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    raise KeyError(annotation)


def _value_type(annotation: Any) -> Any:
    """The type Typer parses a value as: int, float, Path or str (a Literal or a constrained str is checked by the
    configuration, which names the choices)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _value_type(args[0])
    if origin in (typing.Union, getattr(__import__("types"), "UnionType")) and args:
        return _value_type(args[0])
    if annotation in (int, float, Path, bool):
        return annotation
    return str


def _choices(annotation: Any) -> list[str]:
    for arg in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(arg) is Literal:
            return [str(a) for a in typing.get_args(arg)]
    return []


def pick(table: Sequence[Flag], *keys: str, **changes: dict[str, Any]) -> list[Flag]:
    """The flags of `table` that set `keys` (in that order), e.g. the demo's share of align's; `changes` maps a
    key to the fields that differ (`dims={"help": "..."}`)."""
    by_key = {f.key: f for f in table}
    return [replace(by_key[k], **changes.get(k, {})) for k in keys]


# ------------------------------------------------------------------------------------------------ the tables
# command name -> its table, filled by @command: what error messages and `spoctl.docgen` read.
COMMAND_FLAGS: dict[str, list[Flag]] = {}


def flag_for(command_flags: Sequence[Flag], key: str) -> str | None:
    """The flag that sets config `key` (as the user reads it: '--lr', '--lora/--full'), if any."""
    for f in command_flags:
        if key in f.keys:
            return f.name
    return None


def parse_assignments(items: list[str] | None, flag: str, example: str,
                      convert: Callable[[str], Any] = str) -> dict[str, Any] | None:
    """Repeatable `--flag KEY=VALUE` options -> {KEY: convert(VALUE)}, in order; each KEY at most once.

    Used by every DIM=... flag: `--data helpful=a.jsonl`, `--weight helpful=0.5`, `--fail-under helpful=0.6`.
    """
    if not items:
        return None
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key or not raw:
            raise UsageError(f"{flag} {item!r}: expected DIM=VALUE, e.g. {flag} {example}")
        if key in out:
            raise UsageError(f"{flag}: dimension '{key}' is given twice; give each dimension once")
        try:
            out[key] = convert(raw)
        except ValueError:
            raise UsageError(f"{flag} {item!r}: {raw!r} is not a valid value, e.g. {flag} {example}") from None
    return out
