"""Replace one ``## `` section of a markdown file (BENCHMARKS.md) in place (atomic write); the others are kept."""
from __future__ import annotations

import os

from ..report.output import atomic_output_file


def read_section(heading: str, path: str) -> str:
    """The current text of the section under ``heading`` (its ``###`` subsections included), or ``""``."""
    text = open(path).read() if os.path.exists(path) else ""
    if heading not in text:
        return ""
    start = text.index(heading)
    nxt = text.find("\n## ", start + len(heading))
    return text[start:] if nxt < 0 else text[start:nxt + 1]


def write_section(heading: str, body: str, path: str) -> None:
    """Put ``body`` (which starts with ``heading``, a ``## `` line) in place of that section, or append it."""
    if not body.startswith(heading):
        raise ValueError(f"the section body must start with its heading {heading!r}")
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    if heading in text:
        start = text.index(heading)
        nxt = text.find("\n## ", start + len(heading))
        text = text[:start] + body.rstrip("\n") + "\n" + ("" if nxt < 0 else text[nxt:])
    else:
        text = text.rstrip("\n") + "\n\n" + body
    with atomic_output_file(path, replaceable=lambda p: True) as tmp, open(tmp, "w") as f:
        f.write(text)
