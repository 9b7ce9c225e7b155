"""Client-drift corrections applied in the optimizer step: FedProx's proximal pull and SCAFFOLD's control variates.

Both add a data-independent term to each parameter's gradient. They act in the step,
not in the loss, because under DP-SGD Opacus replaces `p.grad` with the clipped, noised
sum of per-sample gradients: a proximal term added to the loss would have no per-sample
gradient and would silently vanish. Added after the noise, the terms are post-processing
and cost no privacy. Opacus's DPOptimizer calls the wrapped optimizer's `step` after
clipping and noising, so wrapping SGD here works with and without DP.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class _DriftCorrected:
    """Adds `mu * (w - w_global)` (FedProx) and `c - c_i` (SCAFFOLD) to each gradient, then the base step.

    A mixin over any torch optimizer: the terms are gradients, so FedProx's pull works with Adam too
    (SCAFFOLD's update counts SGD steps, so the config allows it with SGD only)."""

    def _set_drift(self, anchor: list[torch.Tensor] | None, mu: float, correction: list[torch.Tensor] | None) -> None:
        self.anchor, self.mu, self.correction = anchor, mu, correction
        self.steps = 0

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        for i, p in enumerate(params):
            if p.grad is None:
                continue
            if self.mu and self.anchor is not None:
                p.grad.add_(p - self.anchor[i], alpha=self.mu)
            if self.correction is not None:
                p.grad.add_(self.correction[i])
        self.steps += 1
        return super().step(closure)


class DriftCorrectedSGD(_DriftCorrected, torch.optim.SGD):
    """SGD whose gradient gets `mu * (w - w_global)` (FedProx) and `c - c_i` (SCAFFOLD) before the step."""

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        lr: float,
        momentum: float = 0.0,
        *,
        anchor: list[torch.Tensor] | None = None,
        mu: float = 0.0,
        correction: list[torch.Tensor] | None = None,
    ) -> None:
        super().__init__(list(params), lr=lr, momentum=momentum)
        self._set_drift(anchor, mu, correction)


class DriftCorrectedAdam(_DriftCorrected, torch.optim.Adam):
    def __init__(self, params: Iterable[nn.Parameter], lr: float, *, anchor: list[torch.Tensor] | None = None,
                 mu: float = 0.0, correction: list[torch.Tensor] | None = None) -> None:
        super().__init__(list(params), lr=lr)
        self._set_drift(anchor, mu, correction)


class DriftCorrectedAdamW(_DriftCorrected, torch.optim.AdamW):
    def __init__(self, params: Iterable[nn.Parameter], lr: float, *, anchor: list[torch.Tensor] | None = None,
                 mu: float = 0.0, correction: list[torch.Tensor] | None = None) -> None:
        super().__init__(list(params), lr=lr)  # torch's weight decay 0.01, decoupled
        self._set_drift(anchor, mu, correction)


def make_optimizer(kind: str, params: list[nn.Parameter], lr: float, momentum: float = 0.0, *,
                   anchor: list[torch.Tensor] | None = None, mu: float = 0.0,
                   correction: list[torch.Tensor] | None = None) -> torch.optim.Optimizer:
    """The run's `optimizer` (sgd | adam | adamw) over `params`, drift-corrected; `momentum` is SGD's.
    Opacus's DPOptimizer wraps whichever it is: it clips and noises `p.grad`, then calls this `step`."""
    drift = {"anchor": anchor, "mu": mu, "correction": correction}
    if kind == "sgd":
        return DriftCorrectedSGD(params, lr=lr, momentum=momentum, **drift)
    if kind == "adam":
        return DriftCorrectedAdam(params, lr=lr, **drift)
    if kind == "adamw":
        return DriftCorrectedAdamW(params, lr=lr, **drift)
    raise ValueError(f"optimizer {kind!r}: sgd | adam | adamw")


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    """The model's trainable parameters now, detached: the proximal anchor w_global (the optimizer's order)."""
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


def scaffold_update(
    c_server: list[torch.Tensor], c_site: list[torch.Tensor], start: list[torch.Tensor],
    end: list[torch.Tensor], steps: int, lr: float,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """SCAFFOLD option II (Karimireddy et al., 2020, eq. 4): c_i+ = c_i - c + (x - y_i) / (K * lr).

    Returns (new site control variate, its change delta c_i) for K local steps of plain SGD.
    """
    scale = 1.0 / (max(steps, 1) * lr)
    new = [ci - c + (x - y) * scale for c, ci, x, y in zip(c_server, c_site, start, end, strict=True)]
    return new, [n - ci for n, ci in zip(new, c_site, strict=True)]
