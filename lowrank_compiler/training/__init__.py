"""What runs while training: the optimizer that applies each method's update rules (optimizer) and the DDP /
FSDP2 wrappers (distributed).

May import: every layer below (``errors`` ... ``api``, ``formats``).
"""

from lowrank_compiler.training import distributed
from lowrank_compiler.training.optimizer import optimizer, trainer_optimizers

__all__ = ["optimizer", "trainer_optimizers", "distributed"]
