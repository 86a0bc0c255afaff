"""The head of a timing record and its writing, shared by the benchmark scripts that time
commands as a user runs them (scan_time.py, repair_time.py)."""

from __future__ import annotations

import os
import platform
import shlex
import sys
from datetime import datetime
from pathlib import Path

import torch

from tasks.common.tracking import git_state


def head(title: str, script: str, started: datetime, code_note: str) -> list[str]:
    """Markdown lines: title, the command as run, dates, machine and threads, commit."""
    commit, dirty = git_state()
    command = shlex.join([".venv/bin/python", script, *sys.argv[1:]])
    return [f"### {title} ({started:%Y-%m-%d})", "", f"- command: `{command}`",
            f"- date: {started.isoformat(timespec='seconds')} to "
            f"{datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
            f"- code: {commit[:12]}{' (uncommitted changes)' if dirty else ''}; {code_note}"]


def save(out: Path, text: str) -> None:
    """Write the record (folders made as needed) and print it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(text)
