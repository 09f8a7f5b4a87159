"""Secure aggregation (Bonawitz et al., CCS 2017): the server learns only the aggregate of K updates."""
from ..params import Param
from ..registry import register_defense
from .base import Defense


@register_defense("secure-aggregation")
class SecureAggregation(Defense):
    """The server sees only the mean of ``clients`` clients' updates, the victim's among them (the sum
    divided by the public count ``clients``, so the attacker's view is the exact sum). The other
    ``clients - 1`` clients hold batches of the victim's size drawn from the same dataset and split, with a
    seed, disjoint from every victim batch of the cell; they train as the victim does (the grid's
    ``threat`` local training).

    The cryptographic protocol (pairwise masks, secret-shared seeds, dropout recovery) is not simulated:
    what it guarantees is exactly this view, the exact aggregate and nothing else, so running the
    masking would change no number an attack sees. Attacks target a batch of ``clients`` x batch size
    samples; scoring matches the reconstructions one to one to the victim's samples (the best of them),
    and only the victim's samples count for the leak rate. Training for the accuracy column is
    unchanged (the aggregate of the clients' updates is what plain federated training uses)."""

    family = "aggregation"
    params = (Param("clients", int, 4, "clients whose updates the server sees only as their mean (1: the "
                    "victim alone)", low=1, high=1024),)

    def aggregated_clients(self) -> int:
        return self.clients
