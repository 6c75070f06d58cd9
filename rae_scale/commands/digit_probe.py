"""The quickstart's digit probe: a multinomial logistic regression, in torch so the package needs no
second ML library."""
from __future__ import annotations

import numpy as np
import torch


def fit_logistic_regression(x: np.ndarray, y: np.ndarray, l2: float = 1.0, num_classes: int = 10):
    """Multinomial logistic regression (L2 penalty l2 / 2 * |W|^2 on the summed loss, full-batch
    L-BFGS) of features x [N, D] and labels y [N]. Returns predict(features) -> labels."""
    xs, ys = torch.from_numpy(x).double(), torch.from_numpy(y).long()
    weight = torch.zeros(xs.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=500, tolerance_grad=1e-6, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xs @ weight + bias, ys, reduction="sum")
        loss = loss + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)

    def predict(features: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return (torch.from_numpy(features).double() @ weight + bias).argmax(dim=1).numpy()

    return predict
