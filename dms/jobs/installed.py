"""The executors this dms ships: importing this module imports each one's module,
where it registers itself (``dms.jobs.base.register_executor``). To add an
executor, write its module and name it here; nothing else in dms names it."""

from dms.jobs import collab, compute, mining

__all__ = ["collab", "compute", "mining"]
