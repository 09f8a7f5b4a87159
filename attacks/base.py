"""Small abstract base of every attack plugin."""
from __future__ import annotations

from typing import ClassVar, Sequence

from ..params import Component
from ..threat import AttackTask, Monitor, Reconstruction


class Attack(Component):
    """An attack reconstructs private data from what the threat model gives it.

    The API is batch-first: ``run`` takes many independent tasks (targets, restarts, defense
    settings) so that an engine may solve them in one vectorised program; the default solves them
    one at a time with ``run_one``.
    """

    #: which protocol the attack works in: "gradient" (one shared update) or "collaborative" (rounds)
    setting: ClassVar[str] = "gradient"
    #: what the attack needs to be told beyond the shared update (recorded in every result)
    needs_labels: ClassVar[bool] = False
    #: the attack's objective replays federated averaging's local steps (``AttackTask.local_training``);
    #: grids with local training run only such attacks
    replays_local_training: ClassVar[bool] = False

    @property
    def batches_tasks(self) -> bool:
        """True when ``run`` solves many tasks in one vectorised program, so that a grid gains by handing
        it the targets of several cells at once (the default ``run`` solves them one at a time)."""
        return False

    def victim_batch_size(self) -> int:
        return int(getattr(self, "batch_size", 1))

    def run(self, tasks: Sequence[AttackTask], *, monitors: Sequence[Monitor | None] | None = None
            ) -> list[Reconstruction]:
        monitors = list(monitors) if monitors is not None else [None] * len(tasks)
        return [self.run_one(task, monitor=m) for task, m in zip(tasks, monitors)]

    def run_one(self, task: AttackTask, *, monitor: Monitor | None = None) -> Reconstruction:
        raise NotImplementedError
