"""Error types that map onto the CLI's exit codes.

`BadInput` is anything the user can fix by editing what they passed (spec, store path,
dataset folder): the CLI prints its one-line message and exits 2 before writing anything.
"""


class BadInput(ValueError):
    """User input that cannot be run. The message is one line naming the field and problem."""


class StoreError(RuntimeError):
    """The store on disk is unreadable, corrupt, or from an incompatible schema version."""


class TaskLoadError(BadInput):
    """A task's data could not be loaded from any configured source."""
