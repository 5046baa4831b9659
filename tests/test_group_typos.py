"""A misspelt preset is an error, not a silent run of the defaults: experiment, debug and sweep
are plain (not `optional`) config groups in conf/train.yaml, so Hydra refuses a name it does not
have, lists the ones it has, and exits 1 before any folder is made."""

from __future__ import annotations

import pytest

from conftest import run_cli


@pytest.mark.parametrize("override", ["experiment=quikstart", "debug=fdrr", "sweep=lr_dropuot"])
def test_a_misspelt_preset_is_refused_with_the_ones_there_are(tmp_path, override):
    result = run_cli("tb_lightning.train", override, f"paths.log_dir={tmp_path}")
    assert result.returncode == 1
    group, name = override.split("=")
    assert f"Could not find '{group}/{name}'" in result.stderr
    assert "Available options" in result.stderr
    assert not any(tmp_path.iterdir())  # nothing written
