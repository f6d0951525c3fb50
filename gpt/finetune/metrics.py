"""The benchmarks' own metrics: accuracy; F1 of the positive class (MRPC, QQP); Matthews
correlation (CoLA); Pearson and Spearman correlation (STS-B). Reported in percent, as
GLUE and the GPT-1 paper report them."""
from __future__ import annotations

import numpy as np
import scipy.stats


def accuracy(predictions, labels) -> float:
    return 100.0 * float(np.mean(np.asarray(predictions) == np.asarray(labels)))


def _confusion(predictions, labels) -> tuple[int, int, int, int]:
    p, y = np.asarray(predictions) == 1, np.asarray(labels) == 1
    return int((p & y).sum()), int((~p & ~y).sum()), int((p & ~y).sum()), int((~p & y).sum())


def f1(predictions, labels) -> float:
    tp, _, fp, fn = _confusion(predictions, labels)
    return 100.0 * 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def matthews_corr(predictions, labels) -> float:
    """0 when a row or column of the confusion matrix is empty (e.g. one class predicted)."""
    tp, tn, fp, fn = _confusion(predictions, labels)
    denominator = np.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    return 100.0 * (tp * tn - fp * fn) / denominator if denominator else 0.0


def pearson(predictions, labels) -> float:
    return 100.0 * float(scipy.stats.pearsonr(predictions, labels)[0])


def spearman(predictions, labels) -> float:
    return 100.0 * float(scipy.stats.spearmanr(predictions, labels)[0])


METRICS = {"accuracy": accuracy, "f1": f1, "matthews_corr": matthews_corr,
           "pearson": pearson, "spearman": spearman}
REGRESSION_METRICS = ("pearson", "spearman")


def task_metrics(names, scores, labels, regression: bool) -> dict[str, float]:
    """`names` from scores (class or answer scores; a regression's predictions) and labels."""
    predictions = scores if regression else np.argmax(scores, axis=-1)
    return {name: METRICS[name](predictions, labels) for name in names}
