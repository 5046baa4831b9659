"""Run names are folder names (TensorBoard's runs): no value may put a `/` into them."""

from __future__ import annotations

from tb_lightning.sweep.naming import run_name, single_run_name


def test_a_timm_arch_or_a_path_gives_a_name_without_a_slash():
    overrides = ["model.net.arch=timm/convnext_nano", "data.root=/data/nlm-tb-128/", "seed=1"]
    swept = {"model.net.arch", "data.root"}
    assert run_name(overrides, swept) == "arch=timm-convnext_nano,root=nlm-tb-128"
    assert single_run_name(overrides) == "arch=timm-convnext_nano,root=nlm-tb-128,seed=1"
