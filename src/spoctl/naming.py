"""Names users give spoctl, checked in one place: dimension names and Hugging Face Hub ids."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

# A dimension name becomes part of file names (stages/02-harmless) and metric names (stage2/harmless/...).
DIM_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]{0,63}$")
# A Hub repository id: `name` or `owner/name` (what huggingface_hub accepts for models and datasets).
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")


def check_dim_name(name: str) -> str:
    """`name` if it is a valid dimension name, else ValueError with the rule."""
    if not isinstance(name, str) or not DIM_PATTERN.match(name):
        raise ValueError(f"dimension name {name!r} must start with a letter and use letters, digits, '_' or '-'"
                         " (at most 64 characters)")
    return name


def check_distinct_dims(names: list[str]) -> None:
    """ValueError for two dimensions that differ only by case (Helpful, helpful): their folders (prepared/helpful,
    stages/01-helpful) would be one folder on a case-insensitive file system (macOS, Windows) and overwrite each
    other; a name given twice is refused too."""
    seen: dict[str, str] = {}
    for name in names:
        first = seen.setdefault(name.casefold(), name)
        if first == name and names.count(name) > 1:
            raise ValueError(f"dimension {name!r} is listed twice; each dimension is one stage")
        if first != name:
            raise ValueError(f"dimensions {first!r} and {name!r} differ only by case: their folders would be one on "
                             "macOS and Windows; name them apart")


def is_hub_id(spec: str) -> bool:
    """Whether `spec` is shaped like a Hub id (it may still also name a local path: callers check that first)."""
    return bool(HUB_ID.match(spec))


def check_hub_id(value: str) -> str:
    if not is_hub_id(value):
        raise ValueError("must be a Hugging Face Hub id such as owner/name")
    return value


# For pydantic fields: `dict[DimName, str]`, `list[DimName]`.
DimName = Annotated[str, AfterValidator(check_dim_name)]
HubId = Annotated[str, AfterValidator(check_hub_id)]
