"""Training graphs that share gm's parameters and need less memory (``lean_*``, ``checkpoint_blocks``) or
less time (``fast_*``, ``fuse_siblings``), the kernels they insert (kernels) and FSDP2 outlining (outline).

May import: everything in layers 1-5; never ``frontend``, ``formats`` or ``backends``.
"""

from lowrank_compiler.lowerings.lower import lower

__all__ = ["lower"]
