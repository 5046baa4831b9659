"""docs/benchmarks.md: one section per kind of measurement and machine, each rewritten by its
own benchmark and keeping the others (`make bench` writes cpu or gpu, `benchmarks/startup.py`
writes startup)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

# The page's sections, in order: training figures from a machine without a GPU and from one
# with a GPU, the command start-up times, then time and memory against the data set's size.
SECTIONS = ("cpu", "gpu", "startup", "scale", "image_cache")

PAGE_HEADER = """# Benchmarks

Written by `make bench` (benchmarks/bench.py and benchmarks/startup.py): one section per kind
of machine (CPU only, GPU) and one for command start-up; `make bench-scale`
(benchmarks/scale.py, benchmarks/image_cache.py) writes the scale and image-cache sections.
A run replaces its own section and keeps the others, so figures from a GPU machine and from a
CPU-only machine stand side by side; compare ratios within one section only.
"""


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it, and the number of logical cores."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores"


def write_section(page: Path, kind: str, section: str) -> None:
    """Put `section` in the page as the `kind` section, keeping the others."""
    text = page.read_text() if page.exists() else ""
    sections = {}
    for name in SECTIONS:
        begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
        if begin in text and end in text:
            sections[name] = text[text.index(begin) + len(begin) : text.index(end)].strip("\n")
    sections[kind] = section.strip("\n")
    body = [
        f"<!-- bench:{name} -->\n{sections[name]}\n<!-- /bench:{name} -->"
        for name in SECTIONS
        if name in sections
    ]
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(PAGE_HEADER + "\n" + "\n\n".join(body) + "\n")
