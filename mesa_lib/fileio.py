"""The one atomic file write: every artifact, model, cache and record goes through it.

A reader never sees a half-written file: the content is written to a temporary file in the same
folder and renamed over the target (`os.replace` is atomic on one filesystem). If the write fails
(a full disk, an exception), the temporary file is removed and the old target is left intact.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(target: Path, write: Callable[[Path], None], mode: int = 0o644) -> Path:
    """Call `write(tmp)` on a temporary path beside `target`, then move it onto `target`.

    Args:
        target: the final path; its folder is created if missing.
        write: writes the whole content to the path it is given.
        mode: permission bits of the result (mkstemp's 0600 would hide shared data files).

    Returns:
        `target`.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target
