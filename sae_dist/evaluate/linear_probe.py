"""Binary logistic-regression probes for the probing evaluations (DESIGN.md section 8b):
scikit-learn's `LogisticRegression` (L2, lbfgs, balanced class weights) on standardised
features, returned as a direction and a bias in the features' own units."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits
from torch import Tensor


@dataclass
class LinearProbe:
    """decision(x) = x @ weight + bias; positive = the class predicted."""

    weight: Tensor
    """float64 [d], in the units of the features the probe was fitted on."""
    bias: float

    def decision(self, x: Tensor) -> Tensor:
        """x [n, d] -> float64 [n] decision values."""
        return x.double().cpu() @ self.weight + self.bias


def fit_probe(x: Tensor, y: Tensor, c: float = 1.0, max_iter: int = 1000) -> LinearProbe:
    """Fit a probe on features x [n, d] for labels y bool [n] (both classes present). Features
    are standardised (constant ones left unscaled) for the fit, then the coefficients are
    mapped back, so `decision` takes raw x. `c`: inverse L2 strength on the standardised scale."""
    xs = x.double().cpu().numpy()
    labels = y.cpu().numpy().astype(np.int64)
    if labels.min() == labels.max():
        raise ValueError("a probe needs examples of both classes")
    mean = xs.mean(0)
    std = xs.std(0)
    std[std == 0] = 1.0
    clf = LogisticRegression(C=c, class_weight="balanced", max_iter=max_iter)
    with threadpool_limits(1):  # a small fit: BLAS threads cost more than they give
        clf.fit((xs - mean) / std, labels)
    weight = np.asarray(clf.coef_)[0] / std
    bias = float(np.asarray(clf.intercept_)[0] - mean @ weight)
    return LinearProbe(torch.from_numpy(weight), bias)


def f1(predicted: Tensor, actual: Tensor) -> float:
    """F1 of bool predictions [n] against bool labels [n] (0 when there are no true
    positives)."""
    tp = float((predicted & actual).sum())
    den = float(predicted.sum() + actual.sum())
    return 2 * tp / den if den else 0.0


def accuracy(predicted: Tensor, actual: Tensor) -> float:
    """Fraction of bool predictions [n] equal to the labels [n]."""
    return float((predicted == actual).double().mean())
