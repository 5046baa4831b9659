"""The training entry point with two switches that are not project options: the screens of
docs/experiments.md, round 3, ran through this file so that their figures can be reproduced.

Both switches lost on the folds they were tried on, so neither became a config key; this file
changes nothing unless one of the environment variables is set.

  TBL_EQUALIZE=1    global histogram equalisation (torchvision's equalize) of every image, train
                    and validation alike, before the other transforms;
  TBL_NO_MAXPOOL=1  ResNet without the stem's max-pool (an 8x8 last feature map at 128 px
                    instead of 4x4, about 4x the compute).

  PYTHONPATH=src TBL_NO_MAXPOOL=1 python benchmarks/screen_round3.py experiment=nlm_scratch ...
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from torch import nn
from torchvision.transforms import v2

import tb_lightning.data.datamodule as datamodule
import tb_lightning.models.net as net_module
from tb_lightning import train


def equalize_first(build: Callable[..., v2.Compose]) -> Callable[..., v2.Compose]:
    """The same transform builder with histogram equalisation as the first step."""

    def built(*args: object, **kwargs: object) -> v2.Compose:
        return v2.Compose([v2.RandomEqualize(p=1.0), *build(*args, **kwargs).transforms])

    return built


def without_maxpool(build: Callable[[str], nn.Module]) -> Callable[[str], nn.Module]:
    """The same torchvision model builder with a ResNet's stem max-pool removed."""

    def built(arch: str) -> nn.Module:
        model = build(arch)
        model.maxpool = nn.Identity()
        return model

    return built


if __name__ == "__main__":
    if os.environ.get("TBL_EQUALIZE") == "1":
        datamodule.build_transform = equalize_first(datamodule.build_transform)
        datamodule.build_train_transform = equalize_first(datamodule.build_train_transform)
        print("screen: histogram equalisation on", file=sys.stderr)
    if os.environ.get("TBL_NO_MAXPOOL") == "1":
        net_module.torchvision_model = without_maxpool(net_module.torchvision_model)
        print("screen: ResNet stem without max-pool", file=sys.stderr)
    train.main()
