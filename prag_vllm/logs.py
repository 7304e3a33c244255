"""Quiet console, detailed log file: what ``prag`` prints and where everything else goes.

By default (no ``--verbose``) the console gets the steps (:func:`step`), warnings and
errors of this project, progress bars and results. Everything else goes to
``<work-dir>/prag.log``: this project's INFO lines, vLLM's log lines (all its processes),
torch's and transformers' messages, Python warnings (deprecations, ...), and whatever
vLLM's worker processes write to stdout/stderr (NUMA and Triton notices, loading bars).

How:

* vLLM's own handler writes to :data:`vllm_stream` (``VLLM_LOGGING_STREAM``, read when
  vLLM is imported, in every process), which sends the main process's lines to the log;
* Python warnings are captured into the ``py.warnings`` logger (log file only);
* :func:`engine_output` (around an engine start) points file descriptors 1 and 2 at the log
  file while vLLM spawns its processes, which keep them (this process gets its console
  back afterwards); :func:`server_output` does the same for a whole server run, with
  ``sys.stdout``/``sys.stderr`` moved to copies of the console descriptors.

Nothing is written before the command does real work: records are kept in memory until
an engine starts, or until the command ends with its work directory in place (a command
rejected for bad input leaves no file behind).
"""

from __future__ import annotations

import io
import logging
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

LOG_NAME = "prag.log"
"""The log file in a command's work directory."""
STEPS = "prag_vllm.steps"
"""Logger of the step lines every mode prints."""
OWN = ("prag_vllm", "serving", "offline", "bench", "__main__")
"""Loggers whose warnings reach the console in quiet mode (others': ERROR and up)."""
THIRD_PARTY = ("vllm", "torch", "transformers", "peft", "safetensors", "accelerate", "filelock", "urllib3",
               "httpx", "bm25s", "elastic_transport", "uvicorn.error")
"""Libraries whose stray console handlers are moved to the log file in quiet mode."""
_ENV = ("VLLM_LOGGING_STREAM", "PRAG_LOG_PID", "HF_HUB_DISABLE_PROGRESS_BARS")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class LogFile:
    """An append-only text file opened on demand; writes before :meth:`open` wait in memory."""

    def __init__(self, path: Path | None):
        self.path = path
        self._fd: int | None = None
        self._pending: list[str] = []
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def write(self, text: str) -> int:
        with self._lock:
            if self._fd is not None:
                os.write(self._fd, text.encode("utf-8", "replace"))
            elif self.path is not None:
                self._pending.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def open(self) -> int | None:
        """Create the file (and its directory), write what waited, return its descriptor."""
        with self._lock:
            if self._fd is None and self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                os.write(self._fd, "".join(self._pending).encode("utf-8", "replace"))
                self._pending.clear()
            return self._fd

    def close(self, keep: bool) -> None:
        """Close; with ``keep`` what waited is written if the file's directory exists."""
        if self._fd is None and keep and self.path is not None and self.path.parent.is_dir() and self._pending:
            self.open()
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self._pending.clear()


class _Console:
    """The console as it is at each write: ``sys.stderr`` (which :func:`server_output` swaps and
    test harnesses replace), or during an engine start a copy of the console descriptor."""

    def _stream(self):
        s = _session
        return s.console if s is not None and s.console is not None else sys.stderr

    def write(self, text: str) -> int:
        return self._stream().write(text)

    def flush(self) -> None:
        self._stream().flush()


_console = _Console()


class _ConsoleFilter(logging.Filter):
    """Quiet console: steps, this project's warnings, everybody's errors. A warning repeated with
    the same wording (one per document, say) is shown once, then once more as a pointer to
    the log, which has them all."""

    def __init__(self):
        super().__init__()
        self.seen: dict[tuple[str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == STEPS:
            return True
        own = record.name.split(".")[0] in OWN
        if record.levelno < (logging.WARNING if own else logging.ERROR):
            return False
        if record.levelno >= logging.ERROR:
            return True
        key = (record.name, str(record.msg))
        n = self.seen[key] = self.seen.get(key, 0) + 1
        record.prag_repeat = n > 1
        return n <= 2


class _ConsoleHandler(logging.StreamHandler):
    """Console lines go above the progress bars on screen, not into the middle of one."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        with tqdm.external_write_mode(file=sys.stderr):
            super().emit(record)


class _ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if record.name == STEPS:
            return record.getMessage()
        if getattr(record, "prag_repeat", False):
            where = _session.log.path if _session is not None and _session.log.path is not None else "the log"
            return f"{record.levelname.lower()}: ... more warnings like the last one in {where}"
        return f"{record.levelname.lower()}: {record.getMessage()}"


class _Session:
    """What one command changed (undone by :func:`teardown`)."""

    def __init__(self, log: LogFile, verbose: bool):
        self.log, self.verbose = log, verbose
        self.handlers: list[logging.Handler] = []
        self.levels = {name: logging.getLogger(name).level for name in ("", "bm25s")}
        self.warnings_propagate = logging.getLogger("py.warnings").propagate
        self.env = {key: os.environ.get(key) for key in _ENV}
        self.saved_fds: tuple[int, int] | None = None
        self.streams: tuple = ()
        self.console = None
        """The console while descriptor 2 points at the log (an engine start)."""
        self.hint_shown = False


_session: _Session | None = None
_last_log: Path | None = None


class _VLLMStream(io.TextIOBase):
    """vLLM's log stream (``VLLM_LOGGING_STREAM=ext://prag_vllm.logs.vllm_stream``): in the
    process that set it up, the log file (errors also to the console); in vLLM's own
    processes, their stdout, which :func:`engine_output` pointed at the log file."""

    def write(self, text: str) -> int:
        s = _session
        if s is None or os.environ.get("PRAG_LOG_PID") != str(os.getpid()):
            return sys.stdout.write(text)
        s.log.write(text)
        if " ERROR " in text[:80] or " CRITICAL " in text[:80]:
            _console.write(text)
        return len(text)

    def flush(self) -> None:
        if _session is None:
            sys.stdout.flush()


vllm_stream = _VLLMStream()


def step(message: str) -> None:
    """One line of progress, on the console in every mode (and in the log)."""
    logging.getLogger(STEPS).info(message)


def details_hint() -> str:
    """``" -- details in <log>"`` the first time it is asked in a quiet command, else ``""``."""
    s = _session
    if s is None or s.verbose or s.log.path is None or s.hint_shown:
        return ""
    s.hint_shown = True
    return f" -- details in {s.log.path}"


def verbose() -> bool:
    """Whether the current command shows the libraries' messages (``--verbose``)."""
    return _session is not None and _session.verbose


def log_path() -> Path | None:
    """The current command's log file (None outside a command, or without a work directory)."""
    return _session.log.path if _session is not None else None


def log_path_of_last_session() -> Path | None:
    """The log file the last command wrote (None if it wrote none)."""
    return _last_log


def setup(log_file: str | os.PathLike | None, verbose: bool = False) -> None:
    """Configure logging for one command (undone by :func:`teardown`). ``log_file`` None: no file."""
    global _session, _last_log
    _last_log = None
    if _session is not None:
        teardown(keep=False)
    s = _session = _Session(LogFile(Path(log_file) if log_file is not None else None), verbose)
    s.log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} ==== prag {' '.join(sys.argv[1:])} (pid {os.getpid()})\n")
    root = logging.getLogger()
    file_handler = logging.StreamHandler(s.log)
    file_handler.setFormatter(logging.Formatter(_FORMAT))
    file_handler.setLevel(logging.INFO)
    console = _ConsoleHandler(_console)
    if verbose:
        console.setFormatter(logging.Formatter(_FORMAT))
    else:
        console.setFormatter(_ConsoleFormatter())
        console.addFilter(_ConsoleFilter())
    s.handlers = [file_handler, console]
    for h in s.handlers:
        root.addHandler(h)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    logging.captureWarnings(True)
    if not verbose:
        logging.getLogger("py.warnings").propagate = False
        logging.getLogger("py.warnings").addHandler(file_handler)
        os.environ.update(VLLM_LOGGING_STREAM="ext://prag_vllm.logs.vllm_stream", PRAG_LOG_PID=str(os.getpid()),
                          HF_HUB_DISABLE_PROGRESS_BARS="1")  # transformers' "Loading weights" bars


def _real(stream, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False


def _route_library_handlers(file_handler: logging.Handler) -> None:
    """Move the console handlers that libraries installed on their own loggers to the log file."""
    for name in THIRD_PARTY:
        lg = logging.getLogger(name)
        strays = [h for h in lg.handlers if type(h) is logging.StreamHandler and h is not file_handler
                  and getattr(h, "stream", None) is not vllm_stream]
        for h in strays:
            lg.removeHandler(h)
        if strays and file_handler not in lg.handlers:
            lg.addHandler(file_handler)


def _redirectable(s: _Session | None) -> bool:
    """Quiet, with a log file, and this process's own descriptors behind sys.stdout/sys.stderr
    (not a test harness capturing them, not already redirected)."""
    return (s is not None and not s.verbose and s.log.path is not None and s.saved_fds is None
            and s.console is None and _real(sys.stdout, 1) and _real(sys.stderr, 2))


@contextmanager
def engine_output():
    """Around an engine start: in quiet mode, descriptors 1 and 2 point at the log file while
    vLLM spawns its processes (which keep them: their output goes to the log for good), and
    the console handler writes to a copy of the console. This process's descriptors are
    restored at the end of the block. Else only the log file is opened."""
    s = _session
    if not _redirectable(s):
        if s is not None and not s.verbose:
            s.log.open()
        try:
            yield
        finally:
            quiet_libraries()
        return
    fd = s.log.open()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    s.console = open(saved[1], "w", buffering=1, encoding=sys.stderr.encoding,  # noqa: SIM115
                     errors="backslashreplace", closefd=False)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        s.console.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        s.console.close()
        s.console = None
        for d in saved:
            os.close(d)
        quiet_libraries()


@contextmanager
def server_output():
    """Around a whole server run: in quiet mode, descriptors 1 and 2 point at the log file (every
    process the server starts inherits it) and ``sys.stdout``/``sys.stderr`` write to copies of
    the console descriptors, so the server's own lines (uvicorn's address, access log) stay on
    the console. Restored by :func:`teardown`."""
    s = _session
    if _redirectable(s):
        fd = s.log.open()
        sys.stdout.flush()
        sys.stderr.flush()
        s.saved_fds = (os.dup(1), os.dup(2))
        s.streams = (sys.stdout, sys.stderr)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = open(s.saved_fds[0], "w", buffering=1, encoding=sys.stdout.encoding,  # noqa: SIM115
                          errors=sys.stdout.errors, closefd=False)
        sys.stderr = open(s.saved_fds[1], "w", buffering=1, encoding=sys.stderr.encoding,  # noqa: SIM115
                          errors="backslashreplace", closefd=False)
    elif s is not None and not s.verbose:
        s.log.open()
    yield


def quiet_libraries() -> None:
    """Move libraries' own console handlers (transformers, torch, ...) to the log file; call it
    after a library was first used (a no-op when verbose or outside a command)."""
    s = _session
    if s is not None and not s.verbose:
        _route_library_handlers(s.handlers[0])


def teardown(keep: bool = True) -> None:
    """Undo :func:`setup`: restore the streams, descriptors, handlers and environment. With
    ``keep``, records still in memory go to the log file if its directory exists."""
    global _session, _last_log
    s, _session = _session, None
    if s is None:
        return
    if s.saved_fds is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        swapped = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = s.streams
        for stream in swapped:
            stream.close()
        os.dup2(s.saved_fds[0], 1)
        os.dup2(s.saved_fds[1], 2)
        for fd in s.saved_fds:
            os.close(fd)
    root = logging.getLogger()
    for h in s.handlers:
        root.removeHandler(h)
        for name in ("py.warnings", *THIRD_PARTY):
            logging.getLogger(name).removeHandler(h)
    for name, level in s.levels.items():
        logging.getLogger(name).setLevel(level)
    logging.getLogger("py.warnings").propagate = s.warnings_propagate
    logging.captureWarnings(False)
    for key, value in s.env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    s.log.close(keep)
    _last_log = s.log.path if keep and s.log.path is not None and s.log.path.is_file() else None


@contextmanager
def session(log_file: str | os.PathLike | None, verbose: bool = False):
    """:func:`setup` ... :func:`teardown` around one command; the log is kept unless the
    command was rejected for bad input (``InputError``: nothing may be written)."""
    from prag_vllm.errors import InputError

    setup(log_file, verbose)
    keep = True
    try:
        yield
    except InputError:
        keep = False
        raise
    finally:
        teardown(keep)
