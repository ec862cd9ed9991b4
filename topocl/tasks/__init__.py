"""Task streams (a folder of interchangeable generators registered in `topocl.registry.STREAMS`)."""

from topocl.tasks.base import PROBE_KINDS, Probe, Task

__all__ = ["PROBE_KINDS", "Probe", "Task"]
