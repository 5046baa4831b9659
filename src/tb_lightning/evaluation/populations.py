"""Which population an image comes from, for per-source metrics."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tb_lightning.data.sources import Sample

# NLM file-name prefixes: CHNCXR_0001_0.png (Shenzhen), MCUCXR_0001_0.png (Montgomery). The two
# hospitals differ in TB prevalence, so pooled numbers can hide a gap between them.
FILENAME_PREFIXES = {"CHNCXR": "shenzhen", "MCUCXR": "montgomery"}


def source_of(sample: Sample) -> str:
    """The source named by a known file-name prefix, else the sample's own source field."""
    prefix = Path(sample.path).name.split("_", 1)[0].upper()
    return FILENAME_PREFIXES.get(prefix, sample.source or "unknown")


def source_groups(samples: Sequence[Sample]) -> dict[str, list[int]]:
    """source -> indices, only when the samples come from two or more sources."""
    groups: dict[str, list[int]] = {}
    for i, sample in enumerate(samples):
        groups.setdefault(source_of(sample), []).append(i)
    return dict(sorted(groups.items())) if len(groups) > 1 else {}
