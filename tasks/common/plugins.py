"""A plug-in's params block, validated against the frozen config dataclass it registered.

mesa_lib stays free of pydantic: a plug-in declares its settings once, as a frozen dataclass whose
defaults are the shipped values and whose `field(metadata=...)` holds bounds (`ge`, `gt`, `le`,
`lt`, `pattern`) and a `description`; its `__post_init__` may check more. Here that dataclass is
mirrored as a strict pydantic model, so a params block such as `scan.detectors.mask: {steps: 200}`
gets the same checks and messages as every other key (`scan.detectors.mask.steps: Input should be
greater than or equal to 1, got 0`), and keys left out take the dataclass's defaults. A `seed` field
is never set from a block: the run's seed fills it.

(pydantic's TypeAdapter validates a stdlib dataclass directly, but only with its default,
lenient settings: strictness and unknown-key errors need a config on the class, and mesa_lib may
not import pydantic. `create_model` builds the strict mirror in a few lines.)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model

from tasks.common.settings import as_tuple, describe_error

_BOUNDS = ("ge", "gt", "le", "lt", "pattern", "description")


@functools.cache
def block_model(config: type) -> type[BaseModel]:
    """The strict pydantic mirror of a config dataclass (every field but `seed`, optional)."""
    hints = typing.get_type_hints(config, include_extras=True)
    spec: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        if f.name == "seed" or not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = hints[f.name]
        if typing.get_origin(kind) is tuple or tuple in typing.get_args(kind):
            kind = Annotated[kind, BeforeValidator(as_tuple)]  # YAML gives lists
        bounds = {k: v for k, v in f.metadata.items() if k in _BOUNDS}
        spec[f.name] = (kind, Field(default, **bounds))
    return create_model(f"{config.__name__}Block", __doc__=config.__doc__,
                        __config__=ConfigDict(extra="forbid", frozen=True, strict=True), **spec)


def check_block(config: type, raw: Any, where: str) -> tuple[dict[str, Any], list[str]]:
    """(the block with defaults filled, as JSON values; each problem as 'where.key: ...')."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        return {}, [f"{where}: expected a mapping of settings, got {raw!r}"]
    try:
        model = block_model(config).model_validate(dict(raw))
    except ValidationError as err:
        prefix = tuple(where.split("."))
        return {}, [describe_error({**e, "loc": (*prefix, *e["loc"])})
                    for e in err.errors(include_url=False)]
    try:  # the dataclass's own checks (__post_init__), e.g. a name that must be registered
        config(**model.model_dump())
    except (TypeError, ValueError) as err:
        return {}, [f"{where}.{err}"]
    return json.loads(model.model_dump_json()), []


def check_blocks(raw: Mapping[str, Any], group: str, key: str, kind: str,
                 configs: Mapping[str, type]) -> tuple[dict[str, Any], list[str]]:
    """`raw` with each block of `raw[group][key]` (plug-in name -> settings) checked against its
    plug-in's config (defaults filled in), and the problems found, each naming its key.

    Args:
        kind: what the plug-ins are ("detector", "attack"), for messages.
        configs: plug-in name -> its config dataclass (the registry).
    """
    section = raw.get(group)
    blocks = section.get(key) if isinstance(section, Mapping) else None
    if not isinstance(blocks, Mapping):
        return dict(raw), []  # the params model's own check names the missing or mistyped key
    checked, errors = {}, []
    for name, block in blocks.items():
        if name not in configs:
            errors.append(f"{group}.{key}.{name}: unknown {kind}; known: {sorted(configs)}")
            continue
        checked[name], problems = check_block(configs[name], block, f"{group}.{key}.{name}")
        errors += problems
    return {**raw, group: {**section, key: checked}}, errors


def build(config: type, block: Mapping[str, Any]) -> Any:
    """The config dataclass from a checked block (tuples restored)."""
    values = block_model(config).model_validate(dict(block)).model_dump()
    return config(**values)


def block_schema(config: type) -> dict[str, Any]:
    """JSON schema of a plug-in's block (docs)."""
    return block_model(config).model_json_schema(mode="validation")
