"""Membership inference on a finished model: was this record in the training set?

* ``membership-loss``: the loss-threshold attack of Yeom et al. (CSF 2018): a record whose loss on the
  model is low was probably trained on. Its score is the negative cross-entropy loss.
* ``membership-lira``: the likelihood-ratio attack of Carlini et al. (S&P 2022), **offline**: reference
  models trained on random halves of a population split that holds neither members nor non-members
  give, per record, the distribution of the logit-scaled confidence log(p / (1 - p)) of its true label
  on models that did not train on it (a Gaussian, their eq. 4); the score is how far into the upper tail
  of that distribution the attacked model's confidence lies (the one-sided test of their offline attack).

Why offline LiRA, and not online LiRA or RMIA: reference models that never see a target are independent
of the targets drawn and of the defense under attack, so one set of them, cached like an accuracy run,
serves every defense setting of a (dataset, model, training, seed): the only variant whose reference
training does not grow with the grid at CPU scale. Carlini et al. report offline LiRA close to online at
low FPR (their Fig. 10), well above the loss attack. The online variant (IN models per target) is not
implemented.

Why a fixed variance by default: with few reference models (here 4 to 16) a per-record standard
deviation is itself noisy; Carlini et al. (Section VI.B) find a global variance better below 64
reference models. ``variance: per-example`` fits each record's own.
"""
from __future__ import annotations

from typing import ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import norm
from torch import nn

from ..params import Param
from ..registry import register_attack
from .base import Attack

MEMBERSHIP_PARAMS = (
    Param("members", int, 500, "members scored per cell, and as many non-members (fewer when the split is "
                               "smaller)", low=10),
    Param("max_tpr_ratio", float, 3.0, "the verdict: a defense holds when TPR at 1% FPR <= this x FPR "
                                       "(3: see leakbench.scoring.membership)", low=1.0),
)


def true_label_outputs(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                       batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy loss, logit-scaled confidence log p - log(1 - p) of the true label) per record. The
    models of leakbench end in logits or log-probabilities; log_softmax gives the same for both."""
    model = model.eval()
    losses, confidences = [], []
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            log_p = F.log_softmax(model(images[start:start + batch_size].to(device)).double(), -1).cpu()
            y = labels[start:start + batch_size]
            true = log_p.gather(1, y[:, None]).squeeze(1)
            others = log_p.scatter(1, y[:, None], -torch.inf).logsumexp(1)  # log(1 - p), stable near p = 1
            losses.append(-true)
            confidences.append(true - others)
    return torch.cat(losses), torch.cat(confidences)


class MembershipAttack(Attack):
    """An attack on a finished model that scores records (higher: more likely a member)."""

    setting: ClassVar[str] = "membership"
    needs_labels: ClassVar[bool] = True
    #: reference models it needs (0: none)
    reference_count: int = 0

    def scores(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
               references: Sequence[nn.Module] = ()) -> np.ndarray:
        raise NotImplementedError


@register_attack("membership-loss")
class LossThreshold(MembershipAttack):
    """Yeom et al. 2018: the lower a record's loss, the likelier it is a member (score = -loss)."""

    params = MEMBERSHIP_PARAMS

    def scores(self, model, images, labels, references=()):
        loss, _ = true_label_outputs(model, images, labels)
        return (-loss).numpy()


@register_attack("membership-lira")
class OfflineLiRA(MembershipAttack):
    """Carlini et al. 2022, offline: the attacked model's logit-scaled confidence against a Gaussian fitted
    to the reference models' (which never trained on the record); see the module's note for why."""

    params = (
        *MEMBERSHIP_PARAMS,
        Param("reference_models", int, 8, "reference models, each trained on a random half of the population "
                                          "split", low=2, high=256),
        Param("variance", str, "fixed", "'fixed': one variance over all records (better with few reference "
                                        "models); 'per-example': each record's own",
              choices=("fixed", "per-example")),
    )

    @property
    def reference_count(self) -> int:  # type: ignore[override]
        return self.reference_models

    def scores(self, model, images, labels, references=()):
        if len(references) < 2:
            raise ValueError(f"membership-lira needs at least 2 reference models, got {len(references)}")
        _, target = true_label_outputs(model, images, labels)
        out = torch.stack([true_label_outputs(r, images, labels)[1] for r in references]).numpy()
        mean = out.mean(0)
        variance = out.var(0, ddof=1)
        std = np.sqrt(variance if self.variance == "per-example" else np.full_like(variance, variance.mean()))
        # the offline test: Pr[a model without the record is less confident than the attacked one]
        return norm.logcdf(target.numpy(), loc=mean, scale=std + 1e-30)
