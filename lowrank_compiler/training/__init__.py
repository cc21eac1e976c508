"""What runs while training: the optimizer that applies each method's update rules (optimizer) and the DDP /
FSDP2 wrappers (distributed).

May import: every layer below (``errors`` ... ``api``, ``formats``).
"""
