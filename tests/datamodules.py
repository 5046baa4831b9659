"""Data modules for the tests that build one directly, built as a run builds it: by the factory
of conf/data/*.yaml (`TBDataModule.from_config`) from conf/data/tb_cxr.yaml's values, where each
default is stated once, with the test's own keys over them."""

from __future__ import annotations

import copy
import functools
from typing import Any

from omegaconf import OmegaConf

from conftest import compose_train
from tb_lightning.data.datamodule import TBDataModule


@functools.cache
def _data_defaults() -> dict[str, Any]:
    """The resolved `data.*` keys of the default config (data=tb_cxr), without `_target_`."""
    data = OmegaConf.to_container(compose_train([]).data, resolve=True)
    del data["_target_"]
    return data


def make_datamodule(**keys: Any) -> TBDataModule:
    """A TBDataModule with conf/data/tb_cxr.yaml's values and `keys` (flat `data.*` keys) over
    them. No scan cache unless a test asks for one (scan_cache_dir): tests share no scans."""
    values = {**copy.deepcopy(_data_defaults()), "scan_cache_dir": None, **keys}
    return TBDataModule.from_config(**values)
