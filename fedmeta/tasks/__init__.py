"""Task families and their federated partitions.

A `Federation` is two lists of clients: those that train the meta-model and those it has never seen, on
which personalisation is measured. Every client samples its own tasks from its own data, deterministically
from the `numpy.random.Generator` it is handed.
"""

from fedmeta.tasks.base import ClientData, DataError, Federation, task_rng
from fedmeta.tasks.registry import build_federation

__all__ = ["ClientData", "DataError", "Federation", "build_federation", "task_rng"]
