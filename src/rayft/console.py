"""What a user sees of a run: rayft's own lines on the console, everything else in a log file.

Libraries (Ray, DeepSpeed, bitsandbytes, transformers, torch) write to the process's file
descriptors 1 and 2, some from C++ code, so the driver's descriptors themselves are pointed at
a log file for the run (`os.dup2`: nothing is filtered by reading text). rayft's own lines, the
progress bar and errors go to the original terminal, kept open beside it. Until output_dir may
be written (the pre-flight refuses a run that would find it unexpectedly filled) the log is a
temporary file; it moves to output_dir/logs/driver.log once the run starts. Each training
worker points its own descriptors at output_dir/logs/worker-<rank>.log the same way.

`--verbose` (or RAYFT_VERBOSE=1) redirects nothing: the console shows everything.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Optional, TextIO

LOG_DIR = "logs"
DRIVER_LOG = "driver.log"


_active: Optional["RunConsole"] = None  # the run console of this process, while one is open


def say(line: str) -> None:
    """One of rayft's own lines: on the console the user sees, whether or not a run console is open."""
    if _active is not None:
        _active.say(line)
    else:
        print(line, flush=True)


def verbose_from_env() -> bool:
    return os.environ.get("RAYFT_VERBOSE", "").strip().lower() in ("1", "true", "yes")


def worker_log(log_dir: Path, rank: int) -> Path:
    return log_dir / f"worker-{rank}.log"


def redirect_descriptors(path: Path) -> None:
    """Point this process's stdout and stderr (descriptors 1 and 2) at `path`, appending."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


@contextlib.contextmanager
def output_into(path: Path, verbose: bool = False):
    """While open, this process's descriptors 1 and 2 append to `path` (the libraries' output of a
    step outside any run, such as the demo's generations); `verbose` leaves them alone."""
    if verbose:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = (os.dup(1), os.dup(2))
    redirect_descriptors(path)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


class RunConsole:
    """A context for one run: while it is open, descriptors 1 and 2 write to the run's log and
    `say`/`terminal` reach the console the user sees."""

    def __init__(self, verbose: bool = False):
        self.verbose = verbose
        self.log_path: Optional[Path] = None
        self.terminal: TextIO = sys.stderr
        self._saved: tuple[int, int] | None = None

    def __enter__(self) -> "RunConsole":
        global _active
        _active = self
        if self.verbose:
            return self
        self._saved = (os.dup(1), os.dup(2))
        self.terminal = os.fdopen(os.dup(self._saved[1]), "w", buffering=1)
        handle, name = tempfile.mkstemp(prefix="rayft-driver-", suffix=".log")
        os.close(handle)
        self.log_path = Path(name)
        redirect_descriptors(self.log_path)
        return self

    def say(self, line: str) -> None:
        """One of rayft's own lines, on the console."""
        print(line, file=self.terminal, flush=True)

    def move_to(self, log_dir: Path, name: str = DRIVER_LOG) -> Optional[Path]:
        """The log continues in log_dir/name (what it holds so far comes along)."""
        if self.verbose or self.log_path is None:
            return None
        log_dir.mkdir(parents=True, exist_ok=True)
        target = log_dir / name
        sys.stdout.flush()
        sys.stderr.flush()
        with open(target, "ab") as sink, open(self.log_path, "rb") as source:
            shutil.copyfileobj(source, sink)
        old = self.log_path
        self.log_path = target
        redirect_descriptors(target)
        old.unlink(missing_ok=True)
        return target

    def __exit__(self, exc_type, exc, tb) -> None:
        global _active
        _active = None
        if self._saved is None:
            return
        if exc is not None:
            traceback.print_exception(exc_type, exc, tb)  # the whole story goes to the log
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)
        self._saved = None
        from rayft.errors import RayftError

        if self.log_path is not None and self.log_path.parent == Path(tempfile.gettempdir()) and (
                exc is None or isinstance(exc, RayftError)):
            self.log_path.unlink(missing_ok=True)  # refused before it started: nothing worth keeping
            self.log_path = None
        self.terminal.flush()
        if self.terminal is not sys.stderr:
            self.terminal.close()
            self.terminal = sys.stderr
