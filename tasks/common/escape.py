"""Names from outside (file names, manifest strings, registry names) made safe to show.

A drop file may be called "model\\n\\x1b[2J". Written raw into a log, a terminal, an MLflow run
name or a tag, it forges lines and rewrites the screen. Every such name passes through `escape`
before it reaches a log, a run name, a tag or a printed report: control and format characters
(newlines, ANSI escapes, bidirectional overrides) become their Python escape sequence, and
backslashes are doubled so the result reads unambiguously. JSON output keeps the raw name in
its own field and the escaped one for display.
"""

from __future__ import annotations


def escape(text: object) -> str:
    """`text` with backslashes doubled and non-printable characters as \\n, \\x1b, \\u202e."""
    out = []
    for ch in str(text):
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)
