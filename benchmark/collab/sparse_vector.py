"""The differentially private upload of Shokri & Shmatikov: the sparse vector technique (Dwork & Roth's
NumericSparse) over a participant's update, and the record-level guarantee it implies."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..sampling import laplace_noise
from .upload import upload_count


@dataclass(frozen=True)
class SparseVectorScales:
    """Laplace scales of the DP upload: noise on the threshold, on each candidate, on each released value."""

    threshold: float
    candidate: float
    value: float


def sparse_vector_scales(*, epsilon_c: float, gamma: float, count: int) -> SparseVectorScales:
    """Noise scales of one differentially private upload (Dwork & Roth's NumericSparse, as Shokri &
    Shmatikov use it).

    The budget of one upload (one participant, one epoch) is ``epsilon = count * epsilon_c``: Hitaj et
    al. describe epsilon_c as the budget per parameter, the per-epoch budget being split into c parts.
    With sensitivity ``Delta = 2 * gamma`` (our reading: a released value is bounded to [-gamma, gamma],
    so one record changes it by at most 2 gamma; the selection query |bound(w)| has sensitivity gamma, so
    2 gamma is conservative for it) and ``sigma(e) = 2 c Delta / e``:

    * selection, ``epsilon_1 = 8/9 epsilon``: threshold noise Lap(sigma(epsilon_1)), redrawn after every
      positive answer; candidate noise Lap(2 sigma(epsilon_1));
    * release, ``epsilon_2 = 2/9 epsilon``: value noise Lap(sigma(epsilon_2)). NumericSparse writes the
      release budget as 2/9 epsilon, but each of the c released values costs
      Delta / sigma(epsilon_2) = epsilon / (9 c), i.e. epsilon / 9 in total: the "1/9 for releasing the
      values" of Hitaj et al. Section 9.4 (selection 8/9 + release 1/9 = epsilon).

    ``count`` cancels: threshold 9 Delta / (4 epsilon_c), candidate 9 Delta / (2 epsilon_c), value
    9 Delta / epsilon_c.
    """
    epsilon = count * epsilon_c
    sensitivity = 2.0 * gamma
    epsilon_select, epsilon_release = 8.0 / 9.0 * epsilon, 2.0 / 9.0 * epsilon

    def sigma(budget: float) -> float:
        return 2.0 * count * sensitivity / budget

    return SparseVectorScales(threshold=sigma(epsilon_select), candidate=2.0 * sigma(epsilon_select),
                              value=sigma(epsilon_release))


def sparse_vector_upload(delta: torch.Tensor, *, count: int, epsilon_c: float, tau: float, gamma: float,
                         generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The differentially private upload of Shokri & Shmatikov: at most ``count`` entries of the flat
    update, chosen by the sparse vector technique, released with Laplace noise and bounded by gamma.

    Candidates are examined in a random order; candidate j is selected when
    ``|bound(delta_j)| + Lap(candidate) >= tau + rho``, where rho ~ Lap(threshold) is redrawn after each
    selection (NumericSparse); the scan stops after ``count`` selections. A selected value is released
    as ``bound(bound(delta_j) + Lap(value))`` (the outer bound is post-processing: the server never sees
    more than gamma). Returns (indices, values).
    """
    scales = sparse_vector_scales(epsilon_c=epsilon_c, gamma=gamma, count=count)
    n = delta.numel()
    order = torch.randperm(n, generator=generator)
    bounded = delta.detach().to(torch.float64).clamp(-gamma, gamma)
    margin = bounded[order].abs() + laplace_noise(scales.candidate, n, generator=generator) - tau
    thresholds = laplace_noise(scales.threshold, min(count, n), generator=generator)
    chosen = order[_sparse_vector_scan(margin.tolist(), thresholds.tolist())]
    noisy = bounded[chosen] + laplace_noise(scales.value, chosen.numel(), generator=generator)
    return chosen, noisy.clamp(-gamma, gamma).to(delta.dtype)


def _sparse_vector_scan(margins: list[float], thresholds: list[float]) -> list[int]:
    """Positions whose noisy margin passes the current noisy threshold, which changes after each pass.

    The threshold redraw makes this scan inherently sequential: a plain loop over Python floats is O(|w|)
    (a few tens of ms for 10^5 parameters), where a vectorised search per selection would be O(c |w|).
    """
    passed: list[int] = []
    if not thresholds:
        return passed
    current = 0
    for position, margin in enumerate(margins):
        if margin >= thresholds[current]:
            passed.append(position)
            current += 1
            if current == len(thresholds):
                break
    return passed


def sparse_vector_privacy(*, epsilon_c: float, num_params: int, theta_u: float,
                          uploads: int | None = None) -> dict[str, Any]:
    """The record-level guarantee a ``sparse-vector`` setting implies for one participant.

    ``epsilon`` is the budget of one upload (one epoch of one participant), c * epsilon_c: what Shokri &
    Shmatikov claim. It is not composed over epochs; ``epsilon_basic_composition`` says what sequential
    composition over ``uploads`` uploads would give, for comparison (nobody claims it).
    """
    count = upload_count(theta_u, num_params)
    out: dict[str, Any] = {
        "epsilon": count * epsilon_c,
        "delta": 0.0,
        "epsilon_c": epsilon_c,
        "max_shared_per_epoch": count,
        "scope": "record-level, per participant per epoch (one upload); not composed over epochs",
        "accountant": "sparse-vector",
    }
    if uploads is not None:
        out["uploads"] = uploads
        out["epsilon_basic_composition"] = uploads * count * epsilon_c
    return out
