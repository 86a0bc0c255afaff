"""The building blocks of every params file: strict frozen groups, typed aliases, errors.

Shared by params.yaml (tasks.common.params) and reproduce/params.yaml (tasks.reproduce.params);
it changes rarely, so a new key in one file does not touch the other's readers.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

# Mirror of mesa_lib.models.MODELS, so reading params needs no torch (a test keeps them equal).
MODEL_NAMES = ("preact_resnet18", "resnet18", "resnet20", "resnet8")


class ConfigError(ValueError):
    """params.yaml is unreadable, or a key is unknown, missing, mistyped or out of range."""


def as_tuple(value: Any) -> Any:
    """YAML gives lists; the frozen models hold tuples (hashable)."""
    return tuple(value) if isinstance(value, list) else value


Betas = Annotated[tuple[Annotated[float, Field(gt=0, le=1)], ...], BeforeValidator(as_tuple),
                  Field(min_length=1)]
Strings = Annotated[tuple[str, ...], BeforeValidator(as_tuple), Field(min_length=1)]
Probability = Annotated[float, Field(ge=0, le=1)]
Positive = Annotated[float, Field(gt=0)]
Momentum = Annotated[float, Field(ge=0, lt=1)]
Count = Annotated[int, Field(ge=1)]
BatchSize = Annotated[int, Field(ge=2)]


class Group(BaseModel):
    """A params.yaml group: every key required, none unknown, strict types, immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def describe_error(error: Mapping[str, Any]) -> str:
    """One pydantic error as 'group.key: message, got value'."""
    loc = ".".join(str(p) for p in error["loc"]) or "params"
    what = "group" if len(error["loc"]) == 1 else "key"
    if error["type"] == "missing":
        return f"{loc}: missing {what}"
    if error["type"] == "extra_forbidden":
        return f"{loc}: unknown {what}"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "value_error" and not error["loc"]:
        return message  # the cross-checks name their keys themselves
    return f"{loc}: {message}, got {error['input']!r}"


def read_yaml(path: Path | str) -> Any:
    """Parse a YAML file, naming the file in any error."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None


# --------------------------------------------------------------------------- overlays

OVERLAY_KEY = "overlay_of"


def merged(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `overlay`'s keys: mappings merged key by key, anything else replaced."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def overlay_base(path: Path | str) -> Path | None:
    """The file an overlay names in `overlay_of` (relative to the overlay's folder), or None."""
    raw = read_yaml(path)
    if not isinstance(raw, Mapping) or OVERLAY_KEY not in raw:
        return None
    base = raw[OVERLAY_KEY]
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: {OVERLAY_KEY} must name the base params file, got {base!r}")
    return Path(path).parent / base


def read_params_file(path: Path | str, _seen: tuple[Path, ...] = ()) -> Any:
    """A params file, an overlay merged onto its base first.

    A variant of a params file (params-paper.yaml, reproduce/params-gpu.yaml) holds only what
    differs, under `overlay_of: <base file>`, so a key added to the base is written once.
    Mappings merge key by key (a plug-in block of the base stays unless the overlay gives its
    keys); any other value is replaced.
    """
    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, Mapping) or OVERLAY_KEY not in raw:
        return raw
    base = overlay_base(path)
    if base.resolve() in _seen or base.resolve() == path.resolve():
        raise ConfigError(f"{path}: {OVERLAY_KEY} {raw[OVERLAY_KEY]!r} makes a cycle")
    changes = {k: v for k, v in raw.items() if k != OVERLAY_KEY}
    try:
        parent = read_params_file(base, (*_seen, path.resolve()))
    except ConfigError as err:
        raise ConfigError(f"{path}: its base: {err}") from None
    return merged(parent or {}, changes)


def leaves(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"group.key.sub": value} of every non-mapping value of a nested mapping."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out |= leaves(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out
