"""The two registries hold together with what reads them.

Data sources (data/sources.py DATA_SOURCES): every registered source has its
conf/data/<name>.yaml, every such YAML names a registered source, and the keys a source says it
reads are in its composed config. Metrics (stats/metrics.py METRICS): every row appears in
metrics.json, report.txt, the sweep summary and the final TensorBoard scalars as it declares.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import compose_train
from tb_lightning.config import CONF_DIR
from tb_lightning.data.sources import DATA_SOURCES, Sample
from tb_lightning.engine.dashboard import FINAL_TAGS, final_figures
from tb_lightning.evaluation.evaluate import score_split
from tb_lightning.evaluation.report import format_screening_table
from tb_lightning.stats.metrics import (
    METRICS,
    SCREENING,
    THRESHOLD_SECTION,
    metric,
    weighted_metrics,
)
from tb_lightning.sweep.summary import METRIC_COLUMNS, TEST_COLUMNS, VAL_COLUMNS, WITH_INTERVALS

DATA_YAMLS = sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml"))


# --- data sources --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DATA_SOURCES))
def test_every_source_has_its_yaml_with_the_keys_it_reads(name):
    assert name in DATA_YAMLS, f"conf/data/{name}.yaml is missing for the registered source"
    data = compose_train([f"data={name}"]).data
    assert data.source == name
    missing = [key for key in DATA_SOURCES[name].keys if key not in data]
    assert not missing, f"conf/data/{name}.yaml lacks the keys its scanner reads: {missing}"
    description = DATA_SOURCES[name].description
    assert description and "\n" not in description


@pytest.mark.parametrize("stem", DATA_YAMLS)
def test_every_data_yaml_names_a_registered_source(stem):
    source = OmegaConf.load(CONF_DIR / "data" / f"{stem}.yaml").get("source")
    assert source == stem and source in DATA_SOURCES


def test_the_registry_imports_no_torch():
    """config/checks.py reads it in a Hydra callback before torch is imported."""
    code = (
        "import sys, tb_lightning.data.sources, tb_lightning.config.checks; "
        "print(sorted(m for m in ('torch', 'lightning', 'torchvision') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- metrics -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scored() -> dict:
    """score_split of 40 images from two sources, at threshold 0.5."""
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(24, int), np.ones(16, int)]
    logits = rng.normal(1.5 * labels - 0.75, 1.0).astype(np.float32)
    samples = [
        Sample(f"/d/{i}.png", int(label), str(i), ("a", "b")[i % 2])
        for i, label in enumerate(labels)
    ]
    return score_split("val", samples, logits, 0.5, pos_weight=1.5, n_bootstrap=200, seed=0)


def test_metrics_json_holds_every_screening_figure_in_table_order(scored):
    overall = scored["val"]["overall"]
    keys = [m.key for m in SCREENING]
    assert [k for k in overall if k in keys] == keys
    assert list(overall["ci"]) == keys
    assert overall["ci_method"] == {m.key: m.interval for m in SCREENING}
    assert set(overall["ci_method"].values()) == {"wilson", "bootstrap"}
    for source in scored["val"]["per_source"].values():
        assert list(source["ci"]) == keys
    # Flat keys: one per row that declares one, in table order; the loss is the reference
    # report's, accuracy its `val/acc`.
    flat = [k.removeprefix("val/") for k in scored if k.removeprefix("val/") in keys]
    assert flat == [m.key for m in SCREENING if m.flat]
    assert "val/acc" in scored and "val/accuracy" not in scored
    for m in METRICS:
        if not m.screening:
            assert f"val/{m.key}" in scored, m.key  # computed elsewhere (the loss)


def test_weighted_metrics_gives_every_screening_figure_then_the_counts():
    probs, target = np.array([0.9, 0.2, 0.6, 0.4]), np.array([1, 0, 0, 1])
    values = weighted_metrics(probs, target, 0.5)
    assert list(values) == [m.key for m in SCREENING] + ["tn", "fp", "fn", "tp"]


def test_report_prints_every_screening_row_in_its_section(scored):
    table = format_screening_table(scored["val"]["overall"], 200).splitlines()
    rows = [line for line in table if line.split("  ")[0].strip() in {m.label for m in SCREENING}]
    assert [r.split("  ")[0].strip() for r in rows] == [m.label for m in SCREENING]
    heading = table.index("at p_tb >= 0.500000:")
    for m in SCREENING:
        at = next(i for i, line in enumerate(table) if line.startswith(m.label))
        assert (at > heading) == (m.section == THRESHOLD_SECTION), m.key
        if m.proportion is not None:  # a rate: its fraction of counted images beside it
            assert table[at].rstrip().split()[-1].count("/") == 1, m.key
    bootstrapped = ", ".join(m.short for m in SCREENING if m.interval == "bootstrap")
    assert f"rates Wilson score; {bootstrapped} 200 bootstrap" in table[0]


def test_sweep_summary_columns_are_the_rows_that_declare_them():
    declared = [(f"{s}/{m.key}", m.column_title(s)) for m in METRICS for s in m.sweep]
    columns = [c for c in METRIC_COLUMNS if c[0] != "threshold"]
    assert sorted(columns) == sorted(declared)
    intervals = {f"{s}/{m.key}" for m in METRICS if m.sweep_interval for s in m.sweep}
    assert set(WITH_INTERVALS) == intervals
    # Within a split: threshold-free first (they rank), then the threshold, then the rest.
    for columns in (VAL_COLUMNS, TEST_COLUMNS):
        keys = [k for k, _ in columns]
        free = [k for k in keys if k != "threshold" and metric(k.split("/")[1]).threshold_free]
        assert keys[: len(free)] == free
        if "threshold" in keys:
            assert keys.index("threshold") == len(free)


def test_dashboard_tags_are_the_rows_that_declare_them():
    tagged = {f"val/{m.key}": m.tag("val") for m in METRICS if m.dashboard}
    assert {k: v for k, v in FINAL_TAGS.items() if k != "threshold"} == tagged
    values = {key: 0.5 for key in tagged} | {"threshold": {"value": 0.3}}
    assert set(final_figures(values)) == set(tagged.values()) | {"final/val_operating_threshold"}
    for m in METRICS:
        prefix = "final/val_" if m.threshold_free else "final/val_operating_"
        assert m.tag("val") == prefix + m.key
