"""Checks of files from outside that must run before any parser sees them.

Python's JSON parser recurses: a manifest nested a hundred thousand levels deep ends in
"maximum recursion depth exceeded", a reason that names no file. `manifest_problem` measures the
nesting of the raw text first and refuses such a manifest naming it (mesa_lib.modelio, which
parses manifests, is left as it is: the scan service and `mesa-scan` both call this first).
"""

from __future__ import annotations

from pathlib import Path

from mesa_lib import modelfiles

MAX_JSON_DEPTH = 64  # a manifest is a flat record; JSON nested deeper is refused unparsed


def json_depth(path: Path, limit: int = MAX_JSON_DEPTH) -> int:
    """How deep the JSON text of `path` nests (counting stops past `limit`), read unparsed:
    Python's parser recurses, and a nesting bomb would end in a RecursionError."""
    depth = deepest = 0
    in_string = escaped = False
    with open(path, encoding="utf-8", errors="replace") as fh:
        text = fh.read(2 << 20)  # manifests over 1 MiB are refused by load_manifest anyway
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > limit:
                break
        elif ch in "]}":
            depth -= 1
    return deepest


def manifest_problem(stem: Path, shown: str) -> str:
    """A reason to refuse a JSON file of the model `stem` (`<stem>.json`, a folder's
    config.json) before parsing it ('' if none); names it with `shown` in place of the stem."""
    for path in modelfiles.files(stem):
        if path.name.endswith(".json") and path.is_file() and \
                json_depth(path) > MAX_JSON_DEPTH:
            tail = path.as_posix()[len(Path(stem).as_posix()):]
            return (f"{shown}{tail}: manifest nests JSON deeper than {MAX_JSON_DEPTH} levels "
                    "(a nesting bomb); refused unparsed")
    return ""
