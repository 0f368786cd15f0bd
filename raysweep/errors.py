"""Error types that map onto the CLI's exit codes.

`BadInput` is anything the user can fix by editing what they passed (spec, store path,
dataset folder): the CLI prints its one-line message and exits 2 before writing anything.
"""

import errno


class BadInput(ValueError):
    """User input that cannot be run. The message is one line naming the field and problem."""


class StoreError(RuntimeError):
    """The store on disk is unreadable, corrupt, or from an incompatible schema version."""


class TaskLoadError(BadInput):
    """A task's data could not be loaded from any configured source."""


class DiskFull(RuntimeError):
    """A write to the store failed because its file system has no space left (ENOSPC, or a
    quota's EDQUOT). The message names the store and says so, in those words, whatever
    layer hid the errno (torch reports a short write as "unexpected pos ...")."""

    def __init__(self, store: object, detail: str = ""):
        self.store = str(store)
        self.detail = detail
        super().__init__(f"store {self.store}: no space left on device" + (f" ({detail})" if detail else ""))


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def is_no_space(exc: BaseException | None) -> bool:
    """Whether `exc`, or any exception it was raised from or during, is a full disk."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DiskFull) or (isinstance(exc, OSError) and exc.errno in _NO_SPACE):
            return True
        # Ray re-raises a worker's error as RayTaskError(OSError): the original is its cause,
        # but only its text survives when the type cannot be rebuilt.
        if "[Errno 28]" in str(exc) or "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def no_space_where(exc: BaseException | None, root: object) -> str:
    """'writing <file>' (relative to the store `root`) for the first write in `exc`'s chain
    that names its file; empty if none does."""
    from pathlib import Path

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        name = exc.filename if isinstance(exc, OSError) and exc.errno in _NO_SPACE else None
        if name:
            p, r = Path(name), Path(str(root))
            return f"writing {p.relative_to(r) if p.is_relative_to(r) else p}"
        exc = exc.__cause__ or exc.__context__
    return ""
