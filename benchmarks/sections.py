"""Replace one ``## `` section of BENCHMARKS.md in place (atomic write); the other sections are kept."""
from __future__ import annotations

import os

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "BENCHMARKS.md")


def write_section(heading: str, body: str, path: str = BENCHMARKS) -> None:
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
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
