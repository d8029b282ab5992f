"""One reversible patching mechanism: every change to an upstream object goes through `Patches`,
and `undo()` (or leaving the `with` block) restores the originals in reverse order, bit for bit."""
from __future__ import annotations

_MISSING = object()


class Patches:
    def __init__(self):
        self._undo: list = []

    def setattr(self, obj, name: str, value) -> None:
        old = obj.__dict__.get(name, _MISSING) if hasattr(obj, "__dict__") else getattr(obj, name, _MISSING)

        def restore():
            if old is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)
        setattr(obj, name, value)
        self._undo.append(restore)

    def add_hook(self, handle) -> None:
        """A torch hook handle (or anything with `.remove()`)."""
        self._undo.append(handle.remove)

    def call_on_undo(self, fn) -> None:
        self._undo.append(fn)

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()
        return False
