"""Continuous Bernoulli p(x|z) on grey values x in [0, 1] (Loaiza-Ganem & Cunningham 2019).

p(x|l) = C(l) sigmoid(l)^x (1 - sigmoid(l))^(1 - x): the Bernoulli's BCE plus the
log-normaliser log C that makes it a density on [0, 1]. With the logit l as natural
parameter, C(l) = l / tanh(l / 2) (the paper's 2 artanh(1 - 2 lam) / (1 - 2 lam) at
lam = sigmoid(l)), so A(l) = softplus(l) - log C(l) and E[x] = A'(l) = 1 / (1 - e^-l) - 1 / l.
Both are 0 / 0 at l = 0 (lam = 1/2): there the Taylor series take over.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vae_mlops.likelihoods.base import ExponentialFamily, softplus

# |l| under which the Taylor series replace the closed forms. There the series' next terms are below
# float64's rounding, so autograd through them and the closed form of the other agree; past it the
# closed forms lose at most a few float32 ulps to cancellation.
TAYLOR_BELOW = 0.1
MEAN_TAYLOR_BELOW = 0.5
LOG_2 = 0.6931471805599453


def log_normaliser(logits: Tensor) -> Tensor:
    """log C(l) = log(l / tanh(l / 2)); near 0, log 2 + l^2/12 - 7 l^4/1440 + 31 l^6/90720 - 127 l^8/4838400."""
    small = logits.abs() < TAYLOR_BELOW
    safe = torch.where(small, TAYLOR_BELOW, logits)  # keeps 0/0 out of both the value and its gradient
    exact = torch.log(safe / torch.tanh(0.5 * safe))
    l2 = logits.square()
    series = LOG_2 + l2 * (1 / 12 - l2 * (7 / 1440 - l2 * (31 / 90720 - l2 * (127 / 4838400))))
    return torch.where(small, series, exact)


def cb_mean(logits: Tensor) -> Tensor:
    """E[x] = 1 / (1 - e^-l) - 1 / l; near 0, 1/2 + sum_n B_2n l^(2n-1) / (2n)! (Bernoulli numbers, to l^9)."""
    small = logits.abs() < MEAN_TAYLOR_BELOW
    safe = torch.where(small, MEAN_TAYLOR_BELOW, logits)
    exact = -1 / torch.expm1(-safe) - 1 / safe
    l2 = logits.square()
    series = 0.5 + logits * (1 / 12 - l2 * (1 / 720 - l2 * (1 / 30240 - l2 * (1 / 1209600 - l2 * (1 / 47900160)))))
    return torch.where(small, series, exact)


class ContinuousBernoulli(ExponentialFamily):
    name = "continuous-bernoulli"

    def log_partition(self, logits: Tensor) -> Tensor:
        return softplus(logits) - log_normaliser(logits)

    def mean(self, logits: Tensor) -> Tensor:
        return cb_mean(logits)


LIKELIHOOD = ContinuousBernoulli()
