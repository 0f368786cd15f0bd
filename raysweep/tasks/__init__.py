"""Task registry. Importing this package registers every task."""

from raysweep.tasks import (
    builtin,  # noqa: F401  (registers the built-in tasks)
    real,  # noqa: F401  (registers the real tasks)
)
from raysweep.tasks.base import (
    Example,
    PreparedTask,
    PrepReport,
    Task,
    get_task,
    prepare_task,
    register,
    registered_tasks,
)

__all__ = [
    "Example",
    "PreparedTask",
    "PrepReport",
    "Task",
    "get_task",
    "prepare_task",
    "register",
    "registered_tasks",
]
