"""Task registry. Importing this package registers every task."""

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
from raysweep.tasks import builtin  # noqa: F401  (registers the built-in tasks)
from raysweep.tasks import real  # noqa: F401  (registers the real tasks)

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
