"""Plug-ins that live outside a registry's module: found by name through Python entry points.

A registry (detectors, attacks, model formats) holds what its module and the modules imported
so far registered. A plug-in module registers itself when imported; naming it under an entry
point group of pyproject.toml (`[project.entry-points."mesa_lib.detectors"] transform =
"mesa_lib.transformsearch"`), or of any installed package's metadata, lets the registry import
it the first time that name is asked for, so nothing else imports it and nothing pays for a
plug-in it does not use. (importlib.metadata's entry points are the standard mechanism, as
pytest's and setuptools' plug-ins use; this module only adds the lookup by name.)
"""

from __future__ import annotations

from importlib.metadata import entry_points

DETECTORS = "mesa_lib.detectors"
ATTACKS = "mesa_lib.attacks"


def load(group: str, name: str) -> bool:
    """Import the module entry point `name` of `group` names (its import registers it);
    False if there is no such entry point."""
    found = entry_points(group=group, name=name)
    for point in found:
        point.load()
    return bool(found)


def load_all(group: str) -> None:
    """Import every module `group`'s entry points name (a full list of a registry)."""
    for point in entry_points(group=group):
        point.load()


def names(group: str) -> set[str]:
    """Every name `group`'s entry points offer (loaded or not)."""
    return {point.name for point in entry_points(group=group)}
