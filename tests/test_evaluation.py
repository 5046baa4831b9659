"""Evaluation maths: metrics against scikit-learn, bootstrap intervals, threshold policies.

The Wilson intervals of the rates are checked in tests/test_intervals.py."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn import calibration
from sklearn import metrics as skm

from tb_lightning.config.checks import check_policy
from tb_lightning.core.errors import ConfigError
from tb_lightning.data.sources import Sample
from tb_lightning.evaluation.figures import calibration_bins
from tb_lightning.evaluation.populations import source_groups, source_of
from tb_lightning.evaluation.report import reference_report_metrics, screening_summary
from tb_lightning.stats.bootstrap import bootstrap_ci, bootstrap_weights
from tb_lightning.stats.metrics import weighted_metrics
from tb_lightning.stats.thresholds import choose_threshold


@pytest.fixture
def scores() -> tuple[np.ndarray, np.ndarray]:
    """150 images, 1 in 3 TB, scores rounded so that ties occur."""
    rng = np.random.default_rng(0)
    target = (rng.random(150) < 1 / 3).astype(int)
    probs = np.clip(rng.normal(0.35 + 0.3 * target, 0.2), 0, 1).round(2)
    return probs, target


def sklearn_metrics(probs, target, threshold, weights=None) -> dict[str, float]:
    preds = (probs >= threshold).astype(int)
    (tn, fp), (fn, tp) = skm.confusion_matrix(target, preds, labels=[0, 1], sample_weight=weights)
    return {
        "auroc": skm.roc_auc_score(target, probs, sample_weight=weights),
        "average_precision": skm.average_precision_score(target, probs, sample_weight=weights),
        "sensitivity": skm.recall_score(target, preds, sample_weight=weights),
        "specificity": skm.recall_score(target, preds, pos_label=0, sample_weight=weights),
        "ppv": skm.precision_score(target, preds, sample_weight=weights),
        "npv": skm.precision_score(target, preds, pos_label=0, sample_weight=weights),
        "accuracy": skm.accuracy_score(target, preds, sample_weight=weights),
        "brier": skm.brier_score_loss(target, probs, sample_weight=weights),
        "tn": tn,
        "fp": fp,
        "fn": fn,
        "tp": tp,
    }


def test_metrics_match_sklearn(scores):
    probs, target = scores
    ours = weighted_metrics(probs, target, 0.5)
    for name, expected in sklearn_metrics(probs, target, 0.5).items():
        assert ours[name] == pytest.approx(expected, abs=1e-12), name


def test_bootstrap_replicates_match_sklearn_with_sample_weights(scores):
    """A bootstrap replicate is the metric with multiplicities as sample weights."""
    probs, target = scores
    weights = bootstrap_weights(target, 3, seed=1)
    ours = weighted_metrics(probs, target, 0.45, weights)
    for row in range(3):
        expected = sklearn_metrics(probs, target, 0.45, weights[row])
        for name, value in expected.items():
            assert ours[name][row] == pytest.approx(value, abs=1e-12), (name, row)


def test_bootstrap_keeps_class_sizes():
    target = np.array([0] * 7 + [1] * 3)
    weights = bootstrap_weights(target, 50, seed=0)
    assert (weights[:, target == 0].sum(axis=1) == 7).all()
    assert (weights[:, target == 1].sum(axis=1) == 3).all()


def test_bootstrap_hand_check_small_example():
    """Two TB images, one detected; two Normal images, both correct.

    Resampling the two TB images gives sensitivity 1, 1/2 or 0 with probabilities 1/4, 1/2,
    1/4 (by hand: draws (a,a), (a,b)|(b,a), (b,b)), so the 95% interval is [0, 1]; specificity
    is 1 in every resample, so its interval is [1, 1]: the collapse for which the reports give
    the rates Wilson intervals instead (2/2 correct: [0.342, 1]).
    """
    probs = np.array([0.1, 0.2, 0.9, 0.3])
    target = np.array([0, 0, 1, 1])
    weights = bootstrap_weights(target, 4000, seed=3)
    sens = weighted_metrics(probs, target, 0.5, weights)["sensitivity"]
    for value, expected in ((1.0, 0.25), (0.5, 0.5), (0.0, 0.25)):
        assert np.mean(sens == value) == pytest.approx(expected, abs=0.03)
    ci = bootstrap_ci(probs, target, 0.5, n_resamples=2000, seed=3)
    assert ci["sensitivity"] == (0.0, 1.0)
    assert ci["specificity"] == (1.0, 1.0)
    assert ci["tp"] == (0.0, 2.0)
    summary = screening_summary(probs, target, 0.5, n_bootstrap=2000, seed=3)
    assert summary["ci"]["specificity"] == pytest.approx([0.342380, 1.0], abs=1e-6)
    assert "tp" not in summary["ci"]


def test_bootstrap_sensitivity_interval_is_the_binomial_one():
    """90 of 100 TB images detected: resampled sensitivity is Binomial(100, 0.9) / 100."""
    target = np.array([1] * 100 + [0] * 50)
    probs = np.r_[np.full(90, 0.9), np.full(10, 0.1), np.full(50, 0.2)]
    low, high = bootstrap_ci(probs, target, 0.5, n_resamples=2000, seed=0)["sensitivity"]
    assert low == pytest.approx(stats.binom.ppf(0.025, 100, 0.9) / 100, abs=0.011)
    assert high == pytest.approx(stats.binom.ppf(0.975, 100, 0.9) / 100, abs=0.011)
    again = bootstrap_ci(probs, target, 0.5, n_resamples=2000, seed=0)["sensitivity"]
    assert again == (low, high)  # seeded


def test_screening_summary_who_check():
    target = np.array([1] * 20 + [0] * 20)
    probs = np.r_[np.full(19, 0.9), [0.1], np.full(16, 0.1), np.full(4, 0.8)]
    summary = screening_summary(probs, target, 0.5, n_bootstrap=500, seed=0)
    assert summary["sensitivity"] == 0.95 and summary["specificity"] == 0.8
    assert summary["confusion_matrix"] == [[16, 4], [1, 19]]
    assert summary["who_screening_minimum"]["met"] is True
    assert summary["who_screening_minimum"]["met_by_lower_ci"] is False  # 20 images is few
    low, high = summary["ci"]["sensitivity"]
    assert low < 0.95 <= high
    # The stricter check reads the Wilson lower bounds: 19/20 -> 0.764, 16/20 -> 0.584.
    assert summary["ci_method"]["sensitivity"] == summary["ci_method"]["specificity"] == "wilson"
    assert low == pytest.approx(0.763869, abs=1e-6)


def test_reference_report_metrics_match_sklearn(scores):
    probs, target = scores
    probs = np.clip(probs, 0.01, 0.99)
    logits = np.log(probs / (1 - probs))
    ours = reference_report_metrics(logits, probs, target, 0.4, pos_weight=2.0, prefix="eval")
    preds = (probs >= 0.4).astype(int)
    precision, recall, f1, _ = skm.precision_recall_fscore_support(target, preds, labels=[0, 1])
    weights = np.where(target == 1, 2.0, 1.0)
    loss = skm.log_loss(target, probs, sample_weight=weights) * weights.sum() / len(weights)
    assert ours["eval/loss"] == pytest.approx(loss, rel=1e-9)
    assert ours["eval/acc"] == pytest.approx(skm.accuracy_score(target, preds))
    for i, name in enumerate(("Normal", "Tuberculosis")):
        assert ours[f"eval/precision/{name}"] == pytest.approx(precision[i])
        assert ours[f"eval/recall/{name}"] == pytest.approx(recall[i])
        assert ours[f"eval/f1/{name}"] == pytest.approx(f1[i])


def test_threshold_policies_on_constructed_scores():
    # Normal: 0.1 .. 0.6; TB: 0.35, 0.55, 0.7, 0.8.
    probs = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.35, 0.55, 0.7, 0.8])
    target = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    # Calling TB from 0.55 up: sensitivity 3/4, specificity 5/6 -> J = 0.583, the best (from
    # 0.7: 0.5, from 0.35: 1 - 3/6 = 0.5); F1 = 6/8 = 0.75, also the best (0.35: 8/11,
    # 0.7: 4/6). The threshold lies halfway to the next lower score (0.5).
    assert choose_threshold(probs, target, "youden") == pytest.approx(0.525)
    assert choose_threshold(probs, target, "max_f1") == pytest.approx(0.525)
    # Highest threshold with sensitivity >= target.
    assert choose_threshold(probs, target, "sensitivity", 0.75) == pytest.approx(0.525)
    assert choose_threshold(probs, target, "sensitivity", 0.5) == pytest.approx(0.65)
    assert choose_threshold(probs, target, "sensitivity", 1.0) == pytest.approx(0.325)
    assert choose_threshold([0.2, 0.1, 0.6], [1, 1, 0], "sensitivity", 1.0) == 0.05


def test_max_f1_and_youden_differ_when_tb_is_rare():
    # Youden weighs sensitivity and specificity alike; F1 cares for the rare TB class' precision.
    probs = np.r_[[0.9, 0.6], np.linspace(0.0, 0.5, 40), [0.55, 0.58, 0.62, 0.65]]
    target = np.r_[[1, 1], np.zeros(40), np.zeros(4)].astype(int)
    assert choose_threshold(probs, target, "youden") == pytest.approx((0.6 + 0.58) / 2)
    assert choose_threshold(probs, target, "max_f1") == pytest.approx((0.9 + 0.65) / 2)


def test_policies_agree_with_brute_force(scores):
    probs, target = scores
    candidates = np.unique(probs)[::-1]  # ties go to the higher threshold

    def best(score):
        values = [score((probs >= t).astype(int)) for t in candidates]
        return candidates[int(np.argmax(values))]

    def youden(preds):
        return skm.recall_score(target, preds) + skm.recall_score(target, preds, pos_label=0)

    def same_calls(threshold, score_threshold):
        # The policy's threshold calls TB exactly the images at or above the chosen score.
        assert ((probs >= threshold) == (probs >= score_threshold)).all()
        assert threshold < score_threshold

    same_calls(choose_threshold(probs, target, "youden"), best(youden))
    same_calls(choose_threshold(probs, target, "max_f1"), best(lambda p: skm.f1_score(target, p)))
    meeting = [t for t in candidates if skm.recall_score(target, probs >= t) >= 0.9]
    same_calls(choose_threshold(probs, target, "sensitivity", 0.9), max(meeting))


def test_bad_policy_is_one_sentence():
    with pytest.raises(ConfigError, match=r"threshold.policy='f2' is not one of"):
        check_policy("f2")
    with pytest.raises(ConfigError, match=r"threshold.target=1.5 must be a sensitivity"):
        check_policy("sensitivity", 1.5)


def test_calibration_bins_match_sklearn(scores):
    probs, target = scores
    mean_prob, observed, counts = calibration_bins(probs, target, n_bins=10)
    true_frac, pred_mean = calibration.calibration_curve(target, probs, n_bins=10)
    np.testing.assert_allclose(observed, true_frac)
    np.testing.assert_allclose(mean_prob, pred_mean)
    assert counts.sum() == len(probs)


def test_expected_calibration_error_by_hand(scores):
    """ECE = sum over the 10 bins (lo, hi] (sklearn's calibration_curve bins, checked above) of
    the bin's share of images x |observed TB fraction - mean probability|, counted here with
    np.digitize and a loop, against ours: the point estimate and a bootstrap replicate."""
    probs, target = scores
    bins = np.digitize(probs, np.linspace(0, 1, 11)[1:-1], right=True)

    def ece(w: np.ndarray) -> float:
        total = 0.0
        for k in range(10):
            inside = (bins == k) & (w > 0)
            if inside.any():
                observed = np.average(target[inside], weights=w[inside])
                mean_prob = np.average(probs[inside], weights=w[inside])
                total += w[inside].sum() / w.sum() * abs(observed - mean_prob)
        return total

    point = weighted_metrics(probs, target, 0.5)["ece"]
    assert point == pytest.approx(ece(np.ones_like(probs)), abs=1e-12)
    weights = bootstrap_weights(target, 2, seed=3)
    replicate = weighted_metrics(probs, target, 0.5, weights)["ece"][1]
    assert replicate == pytest.approx(ece(weights[1].astype(float)), abs=1e-12)


def test_sources_from_nlm_prefixes():
    samples = [
        Sample("/d/Normal/CHNCXR_0001_0.png", 0, "CHNCXR_0001_0", "folder"),
        Sample("/d/Tuberculosis/MCUCXR_0104_1.png", 1, "MCUCXR_0104_1", "folder"),
        Sample("/d/Normal/CHNCXR_0002_0.png", 0, "CHNCXR_0002_0", "folder"),
    ]
    assert [source_of(s) for s in samples] == ["shenzhen", "montgomery", "shenzhen"]
    assert source_groups(samples) == {"montgomery": [1], "shenzhen": [0, 2]}
    assert source_groups(samples[:1]) == {}  # one source: no breakdown


def test_figures_are_drawn_when_nothing_is_called_tb(scores):
    """PPV is undefined when no image reaches the threshold: the PR curve is drawn without its
    operating point instead of failing (eval of a weak model on a few images)."""
    from tb_lightning.evaluation.figures import evaluation_figures

    probs, target = scores
    summary = screening_summary(probs, target, 1.01, n_bootstrap=10, seed=0)
    assert summary["ppv"] is None
    figures = evaluation_figures(probs, target, summary)
    assert set(figures) >= {"roc_curve", "pr_curve", "calibration_curve"}


def test_the_calibration_figure_shows_before_and_after(scores):
    """With the probabilities before the temperature, both reliability curves are drawn, each
    labelled with its ECE and Brier score as scikit-learn computes the Brier score."""
    from sklearn.metrics import brier_score_loss

    from tb_lightning.evaluation.figures import calibration_figure

    probs, target = scores
    before = np.clip(probs**0.5, 0, 1)  # a flatter, miscalibrated version of the same ranking
    figure = calibration_figure(probs, target, uncalibrated=before)
    labels = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert labels[1].startswith("before temperature scaling (ECE ")
    assert labels[1].endswith(f"Brier {brier_score_loss(target, before):.3f})")
    assert labels[2].startswith("after temperature scaling (ECE ")
    assert labels[2].endswith(f"Brier {brier_score_loss(target, probs):.3f})")
    alone = calibration_figure(probs, target)
    assert [t.get_text() for t in alone.axes[0].get_legend().get_texts()][1].startswith("model (")


def test_every_figure_says_what_it_is_measured_on(scores):
    from tb_lightning.evaluation.figures import evaluation_figures

    probs, target = scores
    summary = screening_summary(probs, target, 0.5, n_bootstrap=10, seed=0)
    subject = f"test split: {len(target)} images"
    figures = evaluation_figures(probs, target, summary, subject=subject)
    for name, figure in figures.items():
        assert figure.axes[0].get_title().endswith(f"\n{subject}"), name
