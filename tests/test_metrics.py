"""Evaluation metrics match hand-computed values on a hand-made confusion matrix."""
from __future__ import annotations

import math

import pytest
import torch

from speedrun.evaluate import confusion_metrics, unigram_entropy


def test_confusion_metrics_by_hand():
    # labels (rows) x predictions (cols), 3 classes
    cm = torch.tensor([[5., 2., 0.], [1., 3., 1.], [0., 0., 4.]])
    m = confusion_metrics(cm)
    n = 16.0
    assert m["accuracy"] == pytest.approx(12 / n)
    prec = [5 / 6, 3 / 5, 4 / 5]
    rec = [5 / 7, 3 / 5, 4 / 4]
    f1 = [2 * p * r / (p + r) for p, r in zip(prec, rec)]
    support = [7, 5, 4]
    assert m["precision"] == pytest.approx(sum(p * s for p, s in zip(prec, support)) / n)
    assert m["recall"] == pytest.approx(12 / n)  # weighted recall == accuracy
    assert m["f1"] == pytest.approx(sum(f * s for f, s in zip(f1, support)) / n)
    pred = [6, 5, 5]
    cov_xy = 12 * n - sum(p * s for p, s in zip(pred, support))
    mcc = cov_xy / math.sqrt((n * n - sum(p * p for p in pred)) * (n * n - sum(s * s for s in support)))
    assert m["mcc"] == pytest.approx(mcc)


def test_degenerate_cases():
    assert confusion_metrics(torch.zeros(3, 3))["accuracy"] == 0.0
    one_class = confusion_metrics(torch.tensor([[4., 0.], [0., 0.]]))
    assert one_class["accuracy"] == 1.0 and one_class["mcc"] == 0.0  # undefined MCC -> 0
    perfect = confusion_metrics(torch.eye(4) * 3)
    assert perfect["mcc"] == pytest.approx(1.0) and perfect["f1"] == pytest.approx(1.0)


def test_unigram_entropy():
    assert unigram_entropy(torch.tensor([1., 1., 1., 1.])) == pytest.approx(math.log(4))
    assert unigram_entropy(torch.tensor([5., 0., 0.])) == pytest.approx(0.0)
