"""The configuration tables of docs/*.md, generated from the pydantic models in `spoctl.config`.

Each table sits between two marker comments in a Markdown file and is rewritten in place:

    <!-- config:align -->
    | key | flag | type | default | description |
    ...
    <!-- /config:align -->

One row per setting (nested sections flattened: `length.max_length`, `stages.<DIM>.beta`), with the command-line
flag that sets it (read from the command itself), its type and constraints, its default and its `description=`.

    python -m spoctl.docgen            # rewrite the tables (make docs-config)
    python -m spoctl.docgen --check    # exit 1 and list the files whose tables differ from the models
"""

from __future__ import annotations

import argparse
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from . import config
from .naming import DimName, HubId

# section -> (model, the subcommand whose flags set it)
SECTIONS: dict[str, tuple[type[BaseModel], str]] = {
    "prepare": (config.PrepareConfig, "prepare"),
    "align": (config.AlignConfig, "align"),
    "eval": (config.EvalConfig, "eval"),
    "compare": (config.CompareConfig, "compare"),
    "export": (config.ExportConfig, "export"),
}
BLOCK = re.compile(r"(<!-- config:(?P<section>[a-z]+) -->\n)(?P<body>.*?)(<!-- /config:(?P=section) -->)", re.S)


# ------------------------------------------------------------------------------------------------ rows
def _submodel(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _dict_of_models(annotation: Any) -> type[BaseModel] | None:
    """dict[str, StageOverrides] -> StageOverrides (a section per key, e.g. `stages.<DIM>`)."""
    if typing.get_origin(annotation) is dict:
        return _submodel(typing.get_args(annotation)[1])
    return None


def type_name(annotation: Any) -> str:
    """A type as a user reads it: `int`, `sigmoid | ipo | hinge`, `list of str`, `mapping DIM -> str`."""
    if annotation is DimName or annotation == DimName:
        return "DIM"
    if annotation is HubId or annotation == HubId:
        return "Hub id"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " \\| ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [type_name(a) for a in args if a is not type(None)]
        text = " or ".join(parts)
        return f"{text} or null" if type(None) in args else text
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is dict:
        return f"mapping {type_name(args[0])} -> {type_name(args[1])}"
    if origin is typing.Annotated:
        return type_name(args[0])
    if annotation is Path:
        return "path"
    if _submodel(annotation):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(field: FieldInfo) -> str:
    parts = [f"{sign} {value}" for sign, value in config.bounds_of(field.annotation, field.metadata)]
    return f" ({', '.join(parts)})" if parts else ""


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return ""
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, dict)) and not value:
        return "[]" if isinstance(value, list) else "{}"
    return f"`{value}`"


def rows(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, str, str, str]]:
    """(key, type, default, description) for every setting of `model`, nested sections flattened."""
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        text = _one_line(field.description or "")
        each = _dict_of_models(field.annotation)
        if each is not None:  # stages: {DIM: overrides}
            yield key, "mapping DIM -> section", "{}", text
            yield from rows(each, f"{key}.<DIM>.")
        elif _submodel(field.annotation) is not None:
            yield from rows(field.annotation, f"{key}.")
        elif (optional := _submodel_in_optional(field.annotation)) is not None:
            # A whole section that overrides another (stages.<DIM>.loss): its keys are those of the section it
            # replaces, and null means "inherit".
            yield key, f"section ({', '.join(optional.model_fields)}) or null", _default(field), text
        else:
            yield key, type_name(field.annotation) + _bounds(field), _default(field), text


def _submodel_in_optional(annotation: Any) -> type[BaseModel] | None:
    """`LossConfig | None` (a per-stage override of a whole section)."""
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return None
    for arg in typing.get_args(annotation):
        if _submodel(arg):
            return arg
    return None


def _one_line(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def missing_descriptions() -> list[str]:
    """`section.key` of every setting without a `description=` (they all need one)."""
    return [f"{section}.{key}" for section, (model, _) in SECTIONS.items()
            for key, _t, _d, text in rows(model) if not text]


# ------------------------------------------------------------------------------------------------ flags
def command_flags(command: str) -> dict[str, str]:
    """Config key -> the flag of `spoctl COMMAND` that sets it, from the command's flag table (cli/flags.py)."""
    from .cli import app  # noqa: F401 - registers the commands and their tables
    from .cli.flags import COMMAND_FLAGS

    return {key: f.name for f in COMMAND_FLAGS[command] for key in f.keys}


def table(section: str) -> str:
    model, command = SECTIONS[section]
    flags = command_flags(command)
    lines = ["| key | flag | type | default | description |", "| --- | --- | --- | --- | --- |"]
    for key, kind, default, text in rows(model):
        flag = flags.get(key)
        lines.append(f"| `{key}` | {f'`{flag}`' if flag else ''} | {kind} | {default} | {text} |")
    return "\n".join(lines) + "\n"


def render(text: str, tables: dict[str, str] | None = None) -> str:
    """`text` with every config block replaced by its generated table."""
    tables = {} if tables is None else tables

    def fill(m: re.Match[str]) -> str:
        section = m.group("section")
        if section not in SECTIONS:
            raise ValueError(f"unknown config section {section!r} in a marker; known: {', '.join(SECTIONS)}")
        if section not in tables:
            tables[section] = table(section)
        return m.group(1) + tables[section] + m.group(4)

    return BLOCK.sub(fill, text)


def doc_files(root: Path) -> list[Path]:
    files = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    return [f for f in files if f.is_file() and BLOCK.search(f.read_text(encoding="utf-8"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spoctl.docgen", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a table is out of date")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[2], help="the repository")
    args = parser.parse_args(argv)
    tables: dict[str, str] = {}
    stale = []
    for path in doc_files(args.root):
        old = path.read_text(encoding="utf-8")
        new = render(old, tables)
        if new != old:
            stale.append(path)
            if not args.check:
                path.write_text(new, encoding="utf-8")
    verb = "out of date" if args.check else "rewritten"
    for path in stale:
        print(f"{path.relative_to(args.root)}: configuration table {verb}", file=sys.stderr)
    if args.check and stale:
        print("run `make docs-config` to regenerate them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
