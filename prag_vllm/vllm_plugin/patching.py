"""Every change the plugin makes to vLLM, recorded so that it can be undone.

Each install function of the plugin sets vLLM attributes only through a :class:`Patcher`:
``patcher.set(owner, name, value)`` notes what ``owner`` held under ``name`` before (its
own entry, not an inherited one) and sets ``value``. :meth:`Patcher.rollback` restores every
entry in reverse order, deleting the names that were not there, so that vLLM ends up as it
was, name for name, even where one name was patched twice (``set_lora``: parts, then gather).

:func:`prag_vllm.vllm_plugin.register` installs through the process's patcher
(:data:`PATCHES`) and rolls it back when any step fails.
"""

from __future__ import annotations

MISSING = object()
"""What :func:`own` and :meth:`Patcher.original` return for a name the owner does not hold."""


def own(owner: object, name: str) -> object:
    """What ``owner`` itself holds under ``name`` (a class's raw ``classmethod``, not the bound
    method; nothing inherited), or :data:`MISSING` when it holds nothing."""
    namespace = getattr(owner, "__dict__", None)
    if namespace is None:
        return getattr(owner, name, MISSING)
    return namespace.get(name, MISSING)


class Patcher:
    """A log of (owner, name, previous value) for every attribute set through it."""

    def __init__(self) -> None:
        self._log: list[tuple[object, str, object]] = []

    def set(self, owner: object, name: str, value: object) -> None:
        """``setattr(owner, name, value)``, remembering what ``owner`` held before."""
        self._log.append((owner, name, own(owner, name)))
        setattr(owner, name, value)

    def rollback(self) -> None:
        """Undo every :meth:`set`, last first; the log is empty afterwards. An entry that cannot
        be restored does not stop the others (the first such error is raised at the end)."""
        error = None
        while self._log:
            owner, name, before = self._log.pop()
            try:
                if before is MISSING:
                    if name in getattr(owner, "__dict__", {name: None}):
                        delattr(owner, name)
                else:
                    setattr(owner, name, before)
            except Exception as exc:  # restore the rest first
                error = error or exc
        if error is not None:
            raise error

    def original(self, owner: object, name: str) -> object:
        """What ``owner`` held under ``name`` before the first :meth:`set` of it (its current
        own entry where it was not set through this patcher; :data:`MISSING` where absent)."""
        for o, n, before in self._log:
            if o is owner and n == name:
                return before
        return own(owner, name)

    @property
    def patched(self) -> list[tuple[object, str]]:
        """(owner, name) of every set, in order (a name set twice appears twice)."""
        return [(owner, name) for owner, name, _ in self._log]

    def __len__(self) -> int:
        return len(self._log)


PATCHES = Patcher()
"""What :func:`prag_vllm.vllm_plugin.register` installed in this process."""


def default(patcher: Patcher | None) -> Patcher:
    """``patcher``, or a fresh one for an install function called on its own (its changes are
    then not recorded anywhere: tests and benchmarks that patch a single piece)."""
    return Patcher() if patcher is None else patcher
