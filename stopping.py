"""How a run stops: SIGINT/SIGTERM handled in phases from the first line to the last, and reporting
that a closed stdout/stderr (`train.py | tee log`, where Ctrl-C kills tee too) cannot break."""
from __future__ import annotations

import contextlib
import io
import os
import signal
import sys
import threading

from tqdm import tqdm

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """A signal before the loop: stop at once (every write so far is atomic, nothing is half-written)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """SIGINT/SIGTERM over a whole run, in three phases.

    start-up: raise Interrupted (the caller says one line and exits). loop: remember the signal; the
    loop saves a checkpoint after this step and stops; a second signal interrupts at once. done: the
    run is finishing anyway, so signals are ignored. On exit the previous handlers are put back.
    """

    def __init__(self):
        self.signum, self.phase, self.previous = None, "start-up", {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers only work there
            self.previous = {s: signal.signal(s, self.handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        if self.phase == "start-up":
            raise Interrupted(signum)
        if self.phase == "done":
            return
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        say(f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint (send it again to "
            "stop at once)", error=True)


class SafeStream(io.TextIOBase):
    """stdout/stderr that a closed reader cannot break: `train.py | tee log` where Ctrl-C kills tee too.

    The first failed write sends the rest to /dev/null, so the final flush at exit does not fail either.
    """

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            self.stream.write(text)
            self.stream.flush()
        except RuntimeError:  # "reentrant call": a signal handler wrote while the stream was mid-write
            pass
        except (OSError, ValueError):  # BrokenPipeError, EIO; ValueError: the file is closed
            self._to_devnull()
        return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except RuntimeError:
            pass
        except (OSError, ValueError):
            self._to_devnull()

    def _to_devnull(self):
        with contextlib.suppress(OSError, ValueError, AttributeError, io.UnsupportedOperation):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)

    def isatty(self):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            return self.stream.isatty()
        return False

    def fileno(self):
        return self.stream.fileno()


def say(message: str, error: bool = False):
    """Print above the progress bar; never raises because stdout or stderr has gone away."""
    with contextlib.suppress(OSError, ValueError, RuntimeError):  # RuntimeError: see SafeStream.write
        tqdm.write(message, file=sys.stderr if error else sys.stdout)
