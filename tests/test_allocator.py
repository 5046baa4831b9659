"""allocator.keep_large_blocks_in_heap: glibc accepts the settings where it is the C library."""

import platform
import sys

import pytest
import torch

from tb_lightning.core.allocator import keep_large_blocks_in_heap


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="mallopt thresholds are a glibc feature",
)
def test_glibc_accepts_the_thresholds_and_tensors_still_work():
    assert keep_large_blocks_in_heap() is True
    # A block above glibc's default 32 MB mmap limit, freed and allocated again.
    for _ in range(2):
        block = torch.ones(64 * 2**20 // 4)
        assert float(block.sum()) == block.numel()
        del block
