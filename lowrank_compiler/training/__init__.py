"""What runs while training: the optimizer that applies each method's update rules (optimizer), the DDP /
FSDP2 wrappers (distributed) and loss terms a method asks the user to add (``orth_loss``: AdaLoRA's
regulariser with ``orth_in_loss=True``).

May import: every layer below (``errors`` ... ``api``, ``formats``).
"""

from lowrank_compiler.methods.adalora import orth_loss
from lowrank_compiler.training import distributed
from lowrank_compiler.training.optimizer import optimizer, trainer_optimizers

__all__ = ["optimizer", "trainer_optimizers", "distributed", "orth_loss"]
