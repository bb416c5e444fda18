"""bench/novel_pair_agreement.py counts pixel pairs from contingency tables; check it against brute force."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

_PATH = Path(__file__).resolve().parents[1] / "bench" / "novel_pair_agreement.py"
_spec = importlib.util.spec_from_file_location("novel_pair_agreement", _PATH)
pair_agreement = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pair_agreement)


def _brute_force(gt: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    """Same-class and different-class accuracy over ordered pairs of distinct pixels."""
    same_gt = gt[:, None] == gt[None, :]
    same_pred = pred[:, None] == pred[None, :]
    off_diagonal = ~np.eye(gt.size, dtype=bool)
    positives = same_gt & off_diagonal
    negatives = ~same_gt
    return (same_pred & positives).sum() / positives.sum(), (~same_pred & negatives).sum() / negatives.sum()


def test_pair_counts_match_brute_force_over_pairs_of_distinct_pixels():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 4, size=60)
    pred = np.where(rng.random(60) < 0.7, gt, rng.integers(0, 5, size=60))
    contingency = np.zeros((5, 5), dtype=np.int64)
    np.add.at(contingency, (gt, pred), 1)
    counts = pair_agreement.pair_counts(contingency) - gt.size  # drop the self pairs, as the script does
    same, different, balanced = pair_agreement.balanced_accuracy(counts)
    expected_same, expected_different = _brute_force(gt, pred)
    assert np.isclose(same, expected_same) and np.isclose(different, expected_different)
    assert np.isclose(balanced, (expected_same + expected_different) / 2)


def test_a_prediction_that_only_renames_classes_agrees_on_every_pair():
    gt = np.array([0, 0, 1, 1, 2, 2, 2])
    contingency = np.zeros((3, 3), dtype=np.int64)
    np.add.at(contingency, (gt, (gt + 1) % 3), 1)  # every class called by another's name: all pixels wrong
    same, different, _ = pair_agreement.balanced_accuracy(pair_agreement.pair_counts(contingency) - gt.size)
    assert same == 1.0 and different == 1.0
