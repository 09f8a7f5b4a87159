"""DLG on a masked language model (Zhu et al. 2019, Section 4.2 and Table 1): dummy input embeddings and
soft labels optimised with L-BFGS until their gradient matches the shared one, then each dummy embedding
read back as the nearest row of the model's embedding table."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..params import Param
from ..registry import register_attack
from ..threat import TextAttackTask, TextReconstruction
from .base import Attack

#: optimiser steps after which the recovered text is kept (Table 1's rows), besides the last one
RECORDED_STEPS = (0, 10, 20, 30)
DISTANCES = ("embedding-layer", "cosine", "l2")


@register_attack("dlg-text")
class TextDLG(Attack):
    """Algorithm 1 in embedding space. The victim's update is the MLM loss's gradient on one sentence
    with 15% of its tokens masked. The attacker optimises one dummy embedding per position and one soft
    label per position over the vocabulary plus "not masked" (it knows how many tokens were masked, not
    which), so its loss is BERT's: cross-entropy of the positions it labels, divided by the masked count.

    The distance matched is the paper's sum of squared differences over every shared tensor but the
    input embedding table (a dummy embedding never looks the table up, so it has no gradient there to
    compare), divided by the shared update's squared norm: at BERT's init (weights of std 0.02) the raw
    distance is so small that L-BFGS's fixed tolerances would stop it at once; the scale changes no
    minimiser. A position whose word is [MASK] is read from its soft label (the masked word is only in
    the labels)."""

    setting = "text-gradient"
    params = (
        Param("steps", int, 100, "L-BFGS steps (paper: 100 for text)", low=1),
        Param("lr", float, 1.0, "L-BFGS learning rate (paper: 1)", low=1e-6),
        Param("max_iter", int, 20, "objective evaluations per L-BFGS step at most (paper: 20)", low=1),
        Param("history_size", int, 100, "L-BFGS history (paper: 100)", low=1),
        Param("line_search", str, "strong_wolfe",
              "L-BFGS line search: 'strong_wolfe', or 'fixed' (steps of lr, no search: the image attacks' setting)",
              choices=("strong_wolfe", "fixed")),
        Param("distance", str, "embedding-layer",
              "how a dummy embedding is read back as a word: 'embedding-layer' compares what the model sees "
              "(after adding the position and type embeddings and BERT's LayerNorm), 'cosine' and 'l2' compare "
              "the raw embedding with the table's rows", choices=DISTANCES),
    )

    def victim_batch_size(self) -> int:
        return 1

    def run_one(self, task: TextAttackTask, *, monitor=None) -> TextReconstruction:
        model = task.model
        model.eval()
        table = model.get_input_embeddings().weight
        matched = [i for i, p in enumerate(model.parameters()) if p is not table]
        params = [p for i, p in enumerate(model.parameters()) if i in matched]
        target = [task.shared[i].detach().to(table.dtype) for i in matched]
        scale = sum(float((t ** 2).sum()) for t in target) or 1.0
        length, vocab = task.sequence_length, table.shape[0]
        g = torch.Generator().manual_seed(task.seed)
        # dummies ~ N(0, 1) in units of the table's spread (the attacker knows the model): the optimiser
        # works on numbers of order one while the embeddings start at the table's scale
        spread = float(table.detach().std())
        z = torch.randn(1, length, table.shape[1], generator=g).to(table.device, table.dtype).requires_grad_(True)
        logits = torch.randn(length, vocab + 1, generator=g)
        # the prior the attacker knows: a position is masked with probability masked_count / length, and a
        # masked word is any word, so "not masked" starts with that share of each position's label mass
        share = task.masked_count / length
        logits[:, vocab] += math.log(vocab * (1 - share) / share)  # share < 1: [CLS] and [SEP] are never masked
        logits = logits.to(table.device, table.dtype).requires_grad_(True)

        def distance() -> torch.Tensor:
            out = model(inputs_embeds=z * spread).logits[0]
            soft = F.softmax(logits, -1)[:, :vocab]  # the last class: "this position was not masked"
            loss = (-(soft * F.log_softmax(out, -1)).sum()) / task.masked_count
            grads = torch.autograd.grad(loss, params, create_graph=True)
            return sum(((a - b) ** 2).sum() for a, b in zip(grads, target)) / scale

        optimizer = torch.optim.LBFGS([z, logits], lr=self.lr, max_iter=self.max_iter,
                                      history_size=self.history_size,
                                      line_search_fn={"fixed": None}.get(self.line_search, self.line_search))
        evals, last = [0], [math.inf]

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            d = distance()
            z.grad, logits.grad = torch.autograd.grad(d, [z, logits])
            evals[0] += 1
            last[0] = float(d.detach())
            return d.detach()

        def words() -> list[int]:
            return nearest_tokens(model, z.detach() * spread, logits.detach()[:, :vocab], task.mask_token_id,
                                  self.distance)

        history = {0: words()}
        steps, diverged = 0, False
        for step in range(1, self.steps + 1):
            saved = (z.detach().clone(), logits.detach().clone())
            optimizer.step(closure)
            steps = step
            if not (math.isfinite(last[0]) and torch.isfinite(z).all() and torch.isfinite(logits).all()):
                diverged = True
                with torch.no_grad():  # keep the last finite state as the reconstruction
                    z.copy_(saved[0])
                    logits.copy_(saved[1])
                break
            if step in RECORDED_STEPS:
                history[step] = words()
        final = words()
        history[steps] = final
        return TextReconstruction(final, history, steps, evals[0], last[0], diverged)


@torch.no_grad()
def nearest_tokens(model, embeddings: torch.Tensor, label_logits: torch.Tensor, mask_token_id: int,
                   distance: str) -> list[int]:
    """The word of each dummy embedding ``(1, L, H)``: the nearest row of the embedding table under
    ``distance``; where that is [MASK], the soft label's most likely word instead."""
    table = model.get_input_embeddings().weight
    e = embeddings[0]
    if distance == "l2":
        ids = torch.cdist(e, table).argmin(-1)
    elif distance == "cosine":
        ids = (F.normalize(e, dim=-1) @ F.normalize(table, dim=-1).T).argmax(-1)
    else:  # what the model sees: LayerNorm(word + position + type embedding), row by row
        layer = model.base_model.embeddings
        seen = layer(inputs_embeds=embeddings)[0]
        ids = torch.stack([
            torch.cdist(seen[i:i + 1], layer(inputs_embeds=table[None],
                                             position_ids=torch.full((1, table.shape[0]), i, device=table.device))[0]
                        ).argmin() for i in range(e.shape[0])])
    ids = torch.where(ids == mask_token_id, label_logits.argmax(-1), ids)
    return [int(i) for i in ids]
