"""Shorter busy-waiting between vLLM's processes on CPU.

vLLM's worker and engine core pass each step through a shared-memory queue. After every
read, the reader keeps spinning on it (``sched_yield`` in a loop) for one second
(``SpinCondition.busy_loop_s``) before it sleeps on a socket. On a GPU host that costs an
otherwise idle CPU core; on a 2-core CPU host the spinning processes take the very cores
the model and the server need: after each request both keep spinning while the server
reads, merges and loads the next request's adapter (measured: about 2x slower merges and
loads on the server than the same code alone, ``docs/notes/lora_cpu.md``).

Here the window is ``PRAG_VLLM_BUSY_LOOP_S`` seconds (default 0.002: long enough to cover
the gaps between decode steps under load, short enough to stop at once when idle).

A reader past its window sleeps in ``poll`` until the writer's socket ping, re-checking the
queue every ``SHM_READER_RECHECK_INTERVAL_MS`` (vLLM: 5000 ms). With a short window readers
sleep between most messages, and a ping can go missing: ``bench/add_lora.py`` (2026-12-04)
saw one ``add_lora`` of 40 take 5016 ms while the worker spent 6.6 ms on it. The re-check is
therefore :data:`RECHECK_MS` here, so a lost ping costs at most that (an idle reader wakes
50 times a second to look at its queue).
"""

from __future__ import annotations

import functools
import logging

from prag_vllm.vllm_plugin import patching, settings
from prag_vllm.vllm_plugin.patching import Patcher

logger = logging.getLogger(__name__)

DEFAULT_BUSY_LOOP_S = settings.BUSY_LOOP_S.default
RECHECK_MS = 20
"""How often a sleeping reader re-checks its queue without a ping (vLLM: 5000 ms)."""


def busy_loop_seconds() -> float:
    """The reader's spin window (``PRAG_VLLM_BUSY_LOOP_S``; vLLM's own value is 1)."""
    return settings.BUSY_LOOP_S.get()


def install(patcher: Patcher | None = None) -> None:
    """Patch ``SpinCondition`` so readers spin for :func:`busy_loop_seconds` (idempotent)."""
    from vllm.distributed.device_communicators import shm_broadcast

    p = patching.default(patcher)
    cls = shm_broadcast.SpinCondition
    if getattr(cls, "_prag_idle", False):
        return
    init, seconds = cls.__init__, busy_loop_seconds()

    @functools.wraps(init)
    def patched_init(self, is_reader, context, notify_address, busy_loop_s=None):
        init(self, is_reader, context, notify_address, busy_loop_s=seconds if busy_loop_s is None else busy_loop_s)

    p.set(cls, "__init__", patched_init)
    p.set(cls, "_prag_idle", True)
    if shm_broadcast.SHM_READER_RECHECK_INTERVAL_MS > RECHECK_MS:
        p.set(shm_broadcast, "SHM_READER_RECHECK_INTERVAL_MS", RECHECK_MS)
    logger.debug("prag: vLLM shared-memory readers spin for %.3f s after a read", seconds)
