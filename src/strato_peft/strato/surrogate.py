"""A cheap surrogate of the real score, fitted to the archive's real evaluations.

The score of an allocation is its held-out loss gain normalised by the reference
LoRA's: ``(loss_base - loss) / (loss_base - loss_reference)`` (0 = the base model, 1 = as
good as the reference). The surrogate predicts it as::

    score(ranks) ~ sum over module types t of  theta_t * sum_{slots s of type t} sens_s * log2(1 + r_s)

with ``sens_s`` the slot's measured sensitivity: diminishing returns in rank, more for
sensitive slots, one coefficient per module type. ``gain="per_parameter"`` uses the
probe's per-parameter sensitivity as it is; ``gain="mass"`` multiplies it by the slot's
parameters per rank (``d_in + d_out``). Under a params budget the second is the one
whose marginal gain *per parameter* is the per-parameter sensitivity; the first divides
by the size a second time, so it favours small modules (k_proj, v_proj under GQA) more
than the probe says they deserve. ``gain="size"`` ignores the probe (every parameter
equally sensitive): the probe's ablation. The prior sets every ``theta_t`` so
that the reference allocation scores exactly 1; the fit is ridge regression *towards
that prior*, so with two or three real evaluations it stays close to the prior and with
more it learns which module types pay off. Few parameters (one per module type) is the
point: a search gets a dozen real evaluations, not thousands.

Being additive over slots, the surrogate also gives each slot's marginal gain, which
the environment uses as a dense, exact reward decomposition.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from strato_peft.costs import Slot


class Surrogate:
    """Per-module-type ridge regression on sensitivity-weighted log-ranks."""

    def __init__(
        self,
        slots: Sequence[Slot],
        sensitivity: Sequence[float],
        reference_ranks: Sequence[int],
        ridge: float = 1.0,
        gain: str = "per_parameter",
    ) -> None:
        self.types = sorted({s.module_type for s in slots})
        self.type_index = [self.types.index(s.module_type) for s in slots]
        weights = np.asarray(sensitivity, dtype=np.float64)
        sizes = np.asarray([s.d_in + s.d_out for s in slots], dtype=np.float64)
        if gain == "mass":  # the slot's whole first-order gain: per parameter x its size
            weights = weights * sizes / float((weights * sizes).mean())
        elif gain == "size":  # the probe's ablation: every parameter equally sensitive
            weights = sizes / float(sizes.mean())
        elif gain != "per_parameter":
            raise ValueError(f"unknown surrogate gain {gain!r} (per_parameter, mass or size)")
        self.gain = gain
        self.sensitivity = weights
        self.ridge = ridge
        ref = self.features(reference_ranks)
        total = float(ref.sum())
        if total <= 0:
            raise ValueError("the reference allocation has no sensitivity mass to calibrate on")
        self._ref_x = ref
        self.prior = np.full(len(self.types), 1.0 / total)
        self.theta = self.prior.copy()
        self.fitted_on = 0

    def features(self, ranks: Sequence[int]) -> np.ndarray:
        x = np.zeros(len(self.types))
        for i, r in enumerate(ranks):
            if r:
                x[self.type_index[i]] += self.sensitivity[i] * math.log2(1 + r)
        return x

    def predict(self, ranks: Sequence[int]) -> float:
        return float(self.features(ranks) @ self.theta)

    def slot_gain(self, slot: int, rank: int) -> float:
        """What giving ``slot`` rank ``rank`` adds to the prediction (from rank 0)."""
        if not rank:
            return 0.0
        return float(
            self.theta[self.type_index[slot]] * self.sensitivity[slot] * math.log2(1 + rank)
        )

    def fit(self, ranks: Sequence[Sequence[int]], scores: Sequence[float]) -> None:
        """Ridge regression towards the prior: argmin |X theta - y|^2 + p |theta - prior|^2.

        ``p = ridge x |x_ref|^2 / n_types``: the prior weighs about ``ridge`` evaluations of
        reference-sized allocations, whatever the units of the sensitivities.
        """
        if not ranks:
            return
        x = np.stack([self.features(r) for r in ranks])
        y = np.asarray(scores, dtype=np.float64)
        penalty = self.ridge * float(self._ref_x @ self._ref_x) / len(self.types)
        a = x.T @ x + penalty * np.eye(len(self.types))
        b = x.T @ y + penalty * self.prior
        self.theta = np.linalg.solve(a, b)
        self.fitted_on = len(y)

    def describe(self) -> dict[str, float]:
        return {t: float(v) for t, v in zip(self.types, self.theta, strict=True)}
