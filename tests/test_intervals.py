"""Intervals that never claim certainty: Wilson score intervals for the rates (checked against
statsmodels, an independent implementation), the method of each interval in metrics.json, and
the too-few-images label on small groups, down to eval's report.txt and metrics.json."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from statsmodels.stats.proportion import proportion_confint

from conftest import TEST_DATA_DIR, eval_config
from tb_lightning.data.sources import Sample
from tb_lightning.eval import evaluate
from tb_lightning.evaluation.evaluate import score_split
from tb_lightning.evaluation.report import (
    MIN_CLASS_IMAGES,
    format_per_source,
    format_screening_table,
    format_split_block,
    rate_counts,
    screening_summary,
    wilson_interval,
)
from tb_lightning.stats.bootstrap import bootstrap_ci

# Only checkpoints loaded here, nothing trained: loads without the discarded init (conftest).
pytestmark = pytest.mark.usefixtures("quick_loads")

RATES = ("sensitivity", "specificity", "ppv", "npv", "accuracy")
BOOTSTRAPPED = ("auroc", "average_precision", "brier", "ece")


def scored(tp: int, fn: int, fp: int, tn: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and labels with exactly these counts at p_tb >= 0.5."""
    target = np.r_[np.ones(tp + fn), np.zeros(fp + tn)].astype(int)
    probs = np.r_[np.full(tp, 0.9), np.full(fn, 0.1), np.full(fp, 0.8), np.full(tn, 0.2)]
    return probs, target


def statsmodels_wilson(successes: int, trials: int) -> tuple[float, float]:
    with np.errstate(all="ignore"):  # 0/0: statsmodels divides by zero and returns NaN
        return proportion_confint(successes, trials, alpha=0.05, method="wilson")


@pytest.mark.parametrize(
    "tp, fn, fp, tn",
    [
        (0, 12, 0, 14),  # Montgomery-sized, nothing called TB: 0/12, 14/14, PPV 0/0
        (12, 0, 0, 14),  # perfect separation: 12/12, 14/14
        (5, 7, 3, 11),
        (1, 2, 20, 0),  # specificity 0/20, NPV 0/2
        (90, 10, 15, 85),
    ],
)
def test_every_rate_interval_is_the_wilson_one(tp, fn, fp, tn):
    probs, target = scored(tp, fn, fp, tn)
    summary = screening_summary(probs, target, 0.5, n_bootstrap=100, seed=0)
    assert summary["confusion_matrix"] == [[tn, fp], [fn, tp]]
    for name, (successes, trials) in rate_counts(summary["confusion_matrix"]).items():
        low, high = summary["ci"][name]
        expected = statsmodels_wilson(successes, trials)
        if trials == 0:
            assert np.isnan(expected).all()
            assert (low, high) == (None, None) and summary[name] is None, name
        else:
            assert low == pytest.approx(expected[0], abs=1e-12), name
            assert high == pytest.approx(expected[1], abs=1e-12), name
            assert low <= summary[name] <= high, name
    assert summary["ci_method"] == {
        **{name: "bootstrap" for name in BOOTSTRAPPED},
        **{name: "wilson" for name in RATES},
    }
    # Counts are what the intervals are computed from, not figures with an interval of their own.
    assert set(summary["ci"]) == set(RATES + BOOTSTRAPPED)


def test_wilson_interval_at_the_edges():
    """The bootstrap says [0, 0] at 0/12 and [1, 1] at 12/12; Wilson does not."""
    assert wilson_interval(0, 0) == (None, None)
    low, high = wilson_interval(0, 12)
    assert low == 0.0 and 0.2 < high < 0.3
    low, high = wilson_interval(12, 12)
    assert 0.7 < low < 1.0 and high == 1.0  # 1.0 is possible, never the whole interval
    assert wilson_interval(11, 12)[1] < 1.0  # one miss: 1.0 is out of the interval
    for successes, trials in ((0, 12), (12, 12), (11, 12), (3, 7), (0, 1), (1, 1)):
        ours = wilson_interval(successes, trials)
        assert ours == pytest.approx(statsmodels_wilson(successes, trials), abs=1e-12)


def test_perfect_separation_gives_no_certain_rate():
    probs, target = scored(12, 0, 0, 14)
    boot = bootstrap_ci(probs, target, 0.5, n_resamples=500, seed=0)
    assert boot["sensitivity"] == (1.0, 1.0)  # what the report printed before
    summary = screening_summary(probs, target, 0.5, n_bootstrap=500, seed=0)
    for name in RATES:
        low, high = summary["ci"][name]
        assert low < 1.0 and high == 1.0, name
    # 12 of 12 detected cannot show sensitivity >= 0.90 at its lower bound.
    assert summary["who_screening_minimum"]["met"] is True
    assert summary["ci"]["sensitivity"][0] < 0.90
    assert summary["who_screening_minimum"]["met_by_lower_ci"] is False
    # AUROC keeps its bootstrap, which has no spread here: the table says it is no certainty.
    assert summary["ci"]["auroc"] == [1.0, 1.0]
    row = next(
        r for r in format_screening_table(summary, 500).splitlines() if r.startswith("AUROC")
    )
    assert "[1.000, 1.000]  (zero width: every resample gave this value; not certainty)" in row


def test_the_table_says_which_interval_and_drops_the_count_intervals():
    probs, target = scored(0, 12, 0, 14)
    summary = screening_summary(probs, target, 0.5, n_bootstrap=200, seed=0)
    table = format_screening_table(summary, 200)
    assert (
        "95% CI: rates Wilson score; AUROC, AP, Brier, ECE 200 bootstrap resamples (stratified)"
        in table.splitlines()[0]
    )
    assert "at p_tb >= 0.500000:" in table
    lines = {line.split("  ")[0]: line for line in table.splitlines()}
    assert "0.000   [0.000, 0.242]  0/12" in lines["Sensitivity"]
    assert "1.000   [0.785, 1.000]  14/14" in lines["Specificity"]
    assert lines["PPV"].split() == ["PPV", "n/a", "n/a", "0/0"]
    assert "Confusion counts" not in table
    assert "too few images" not in table.lower()  # 12 and 14 images: no label


def samples_of(source: str, n_tb: int, n_normal: int) -> list[Sample]:
    return [
        Sample(f"/x/{source}_{label}_{i}.png", label, f"{source}{label}{i}", source)
        for label, n in ((1, n_tb), (0, n_normal))
        for i in range(n)
    ]


def test_small_groups_are_labelled_in_the_summary_the_report_and_metrics_json():
    samples = samples_of("montgomery", 12, 14) + samples_of("tiny", 3, 20)
    labels = np.array([s.label for s in samples])
    rng = np.random.default_rng(0)
    logits = rng.normal(2.0 * labels - 1.0, 1.5)
    scores = score_split("test", samples, logits, 0.5, pos_weight=1.0, n_bootstrap=200, seed=0)
    scores = json.loads(json.dumps(scores))  # as metrics.json holds them
    overall, per_source = scores["test"]["overall"], scores["test"]["per_source"]
    assert overall["too_few_images"] is False and overall["small_classes"] == {}
    assert per_source["montgomery"]["too_few_images"] is False
    tiny = per_source["tiny"]
    assert tiny["too_few_images"] is True
    assert tiny["small_classes"] == {"Tuberculosis": 3}
    assert tiny["min_class_images"] == MIN_CLASS_IMAGES == 10
    for block in (overall, *per_source.values()):
        assert block["ci_method"]["sensitivity"] == "wilson"
        assert block["ci_method"]["auroc"] == "bootstrap"
        assert "tp" not in block["ci"]

    rows = format_per_source(per_source, 0.5).splitlines()
    assert "with 95% Wilson score intervals" in rows[0]
    tiny_row = next(r for r in rows if r.startswith("tiny"))
    assert tiny_row.endswith("too few images to say much: 3 Tuberculosis < 10")
    assert "too few" not in next(r for r in rows if r.startswith("montgomery"))
    block = format_split_block(scores, "test", 200)
    assert "Too few images to say much" not in block  # 15 TB, 34 Normal overall

    # A split with fewer than 10 of both classes says so beside its table.
    few = samples_of("a", 2, 5) + samples_of("b", 2, 3)
    labels = np.array([s.label for s in few])
    scores = score_split("val", few, 3.0 * labels - 1.5, 0.5, 1.0, n_bootstrap=100, seed=0)
    table = format_screening_table(scores["val"]["overall"], 100)
    assert table.splitlines()[1] == "Too few images to say much: 8 Normal, 4 Tuberculosis < 10"


def test_eval_calling_every_image_normal_gives_sensitivity_an_upper_bound(trained_run, tmp_path):
    """threshold.value=0.9999: no image reaches it, sensitivity is 0 of the val TB images, and
    its interval still reaches above 0 in report.txt and metrics.json (eval's task in-process,
    as `python -m tb_lightning.eval` composes it: its command line is tested elsewhere)."""
    cfg = eval_config(
        trained_run / "checkpoints" / "best.ckpt",
        tmp_path,
        "threshold.value=0.9999",
        "eval.bootstrap=2000",  # eval's default, which the report names
        f"paths.data_dir={TEST_DATA_DIR}",
    )
    evaluate(cfg)
    rows = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    assert {r["predicted_label"] for r in rows} == {"0"}, "some image reached p_tb >= 0.9999"

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    overall = metrics["val"]["overall"]
    n_tb = overall["counts"]["Tuberculosis"]
    assert overall["sensitivity"] == 0.0 and metrics["val/sensitivity"] == 0.0
    low, high = overall["ci"]["sensitivity"]
    assert low == 0.0 and high > 0.0
    assert high == pytest.approx(statsmodels_wilson(0, n_tb)[1], abs=1e-12)
    assert overall["ppv"] is None and overall["ci"]["ppv"] == [None, None]
    assert overall["ci_method"]["sensitivity"] == "wilson"
    assert overall["ci_method"]["auroc"] == "bootstrap"
    # The session's val split has 8 Normal and 4 TB images: too few to say much.
    assert overall["too_few_images"] is True

    report = (tmp_path / "report.txt").read_text()
    sensitivity = next(line for line in report.splitlines() if line.startswith("Sensitivity"))
    assert sensitivity.split()[:4] == ["Sensitivity", "0.000", "[0.000,", f"{high:.3f}]"]
    assert f"{high:.3f}" != "0.000"
    assert "at p_tb >= 0.999900:" in report
    assert "95% CI: rates Wilson score; AUROC, AP, Brier, ECE 2000 bootstrap resamples" in report
    assert "Too few images to say much: 8 Normal, 4 Tuberculosis < 10" in report
    assert "Confusion counts" not in report


def test_an_interval_that_prints_as_one_number_is_flagged_like_a_zero_width_one():
    """[0.130, 0.130] reads as certainty even when the resamples differ past the third decimal."""
    probs, target = scored(0, 12, 0, 14)
    summary = screening_summary(probs, target, 0.5, n_bootstrap=200, seed=0)
    summary["ece"], summary["ci"]["ece"] = 0.1301, [0.13004, 0.13021]
    summary["brier"], summary["ci"]["brier"] = 0.25, [0.2, 0.3]
    rows = format_screening_table(summary, 200).splitlines()
    ece = next(r for r in rows if r.startswith("ECE"))
    brier = next(r for r in rows if r.startswith("Brier"))
    assert "[0.130, 0.130]  (zero width" in ece
    assert "zero width" not in brier
