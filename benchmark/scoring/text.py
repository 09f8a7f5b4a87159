"""Text reconstruction metrics on token ids: what fraction of a sentence's tokens came back in place
(token accuracy), and whether all of them did (exact match). Both compare position by position, as
the attack recovers one word per position; only the sentence's own tokens count ([CLS] and [SEP] are
BERT's framing, known to everyone)."""
from __future__ import annotations

import torch

from ..registry import register_metric
from .reconstruction import Metric


class TokenMetric(Metric):
    """A per-sentence metric of recovered token ids ``(N, L)`` against the originals ``(N, L)``."""

    def update(self, reconstruction: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        values = self.per_sample(torch.as_tensor(reconstruction), torch.as_tensor(original))
        self._values.append(values)
        return values


@register_metric("token_accuracy")
class TokenAccuracy(TokenMetric):
    def per_sample(self, x, y):
        return (x == y).float().mean(-1)


@register_metric("exact_match")
class ExactMatch(TokenMetric):
    def per_sample(self, x, y):
        return (x == y).all(-1).float()


def score_tokens(recovered: list[int], original: list[int]) -> dict[str, float]:
    """Token accuracy and exact match of one sentence, its framing tokens ([CLS] first, [SEP] last) left out."""
    x, y = torch.tensor([recovered[1:-1]]), torch.tensor([original[1:-1]])
    return {"token_accuracy": float(TokenAccuracy().per_sample(x, y)[0]),
            "exact_match": float(ExactMatch().per_sample(x, y)[0])}
