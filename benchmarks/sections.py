"""Replace one ``## `` section of the repository's BENCHMARKS.md in place (:mod:`ecif_fast.evaluation.sections`)."""
from __future__ import annotations

import os

from ecif_fast.evaluation import sections

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "BENCHMARKS.md")


def read_section(heading: str, path: str = BENCHMARKS) -> str:
    return sections.read_section(heading, path)


def write_section(heading: str, body: str, path: str = BENCHMARKS) -> None:
    sections.write_section(heading, body, path)
