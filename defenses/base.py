"""Small abstract base of every defense plugin."""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..params import Component
from ..threat import IDENTITY_MAP, AttackerMap, LocalTraining, parameter_gradients, straight_through
from ..training import train_with_defense


class Defense(Component):
    """A defense transforms the update a victim shares and, where it needs one, changes training.

    The same object drives the accuracy run (every training step goes through ``compute_update``
    and ``transform``) and the attack run (the shared update is ``transform(compute_update(...))``),
    so no path behaves differently when attacked.
    """

    #: families group settings in tables ("noise", "sparsification", "quantization", ...)
    family: ClassVar[str] = "other"
    #: ``transform`` draws no randomness, so an attacker who knows the code may replay it on a would-be
    #: update (straight-through where it is not differentiable); a submitted defense may opt in
    replayable_transform: ClassVar[bool] = False

    def victim_batch_size(self, default: int) -> int:
        """The batch size the victim trains with (``large-batch`` changes it)."""
        return default

    def compute_update(self, model: nn.Module, x: torch.Tensor, soft_labels: torch.Tensor, *,
                       generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """The victim's raw update on a batch: the gradient of the mean loss (DP-SGD overrides this)."""
        return [g.detach() for g in parameter_gradients(model, x, soft_labels)]

    def transform(self, update: list[torch.Tensor], *, generator: torch.Generator | None = None
                  ) -> list[torch.Tensor]:
        """What is shared instead of ``update``. The default shares it unchanged."""
        return [u.clone() for u in update]

    def share(self, model: nn.Module, x: torch.Tensor, soft_labels: torch.Tensor, *,
              generator: torch.Generator | None = None) -> list[torch.Tensor]:
        return self.transform(self.compute_update(model, x, soft_labels, generator=generator),
                              generator=generator)

    def aggregated_clients(self) -> int:
        """How many clients' updates the server sees only as their mean (``secure-aggregation``)."""
        return 1

    def share_after_local_training(self, model: nn.Module, x: torch.Tensor, soft_labels: torch.Tensor,
                                   local: LocalTraining, *, generator: torch.Generator | None = None
                                   ) -> list[torch.Tensor]:
        """What is shared under federated averaging: ``local``'s update, each local step's gradient from
        ``compute_update``, then ``transform``. FedSGD (one step on the whole batch) is exactly ``share``."""
        if local.fedsgd(len(x) // local.clients):
            return self.share(model, x, soft_labels, generator=generator)
        update = local.victim_update(model, x, soft_labels,
                                     lambda m, xb, sb: self.compute_update(m, xb, sb, generator=generator))
        return self.transform(update, generator=generator)

    def attacker_map(self, shared: list[torch.Tensor]) -> AttackerMap:
        """What an adaptive attacker can replay of this defense, given the update as shared: by default
        ``transform`` itself with straight-through gradients when it is replayable, else the identity
        (noise has no deterministic part). Defenses with a better view override this (pruning: the
        coordinates that survived). Adaptive attacks use this, never a defense's name."""
        if not self.replayable_transform:
            return IDENTITY_MAP

        def replay(update: list[torch.Tensor]) -> list[torch.Tensor]:
            replayed = self.transform([u.detach() for u in update])
            return [straight_through(u, r) for u, r in zip(update, replayed)]

        return AttackerMap(f"{self.label()} replayed, straight-through", replay)

    def accuracy_run(self, *, model: nn.Module, train, test, config, seed: int) -> dict[str, Any]:
        """The accuracy column for this setting: by default, train ``model`` on ``train`` with every
        step's update passed through this defense, then test. Defenses that live inside another
        protocol (e.g. distributed selective SGD) override this to run that protocol instead.
        Returns at least ``{"accuracy": float}``."""
        return train_with_defense(model, self, train, test, config, seed=seed)

    def privacy(self, *, steps: int, sample_rate: float) -> dict[str, Any]:
        """Formal privacy guarantee of training under this defense; {} when it has none."""
        return {}

    def label(self) -> str:
        """Short human label of this setting for tables, e.g. ``gaussian-noise(variance=0.001)``."""
        params = self.get_params()
        if not params:
            return self.registry_name
        inner = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        return f"{self.registry_name}({inner})"
