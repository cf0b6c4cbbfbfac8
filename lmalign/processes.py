"""Every process a command starts ends with it (docs/design.md, Launch and signals).

`main()` makes lmalign a child subreaper (Linux's PR_SET_CHILD_SUBREAPER): a descendant whose
parent exits, such as the generation and scoring jobs NeMo-Skills starts in sessions of their
own, is re-parented to lmalign instead of init, so lmalign still finds it. SIGTERM and SIGHUP
(and SIGUSR1/SIGUSR2 unless a launcher, such as submitit, handles them) become `Stopped` in the
main thread (as Ctrl-C becomes KeyboardInterrupt), so every `finally`
runs: a server's block stops its server, a cell stays `.partial` for the re-run. When the
command ends, whatever it started and is still running is asked to end (SIGTERM), given a
bounded wait that is logged with its length, then killed. Training keeps its own handlers
while it runs (lmalign.training.StopOnSignal: save a checkpoint, then stop).
"""

from __future__ import annotations

import ctypes
import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager

from lmalign.errors import Stopped

log = logging.getLogger(__name__)
PR_SET_CHILD_SUBREAPER = 36
STOP_GRACE_SECONDS = 20
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
# What SLURM sends before a preemption or a time limit. Their default action ends a process at
# once, with no `finally` and no child stopped; a launcher's handler (submitit's requeue) is kept.
CLUSTER_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


def become_subreaper() -> bool:
    """Orphaned descendants come to this process (Linux); False where that is not possible."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _raise_stopped(number: int, _frame) -> None:
    raise Stopped(number)


def is_ours(handler) -> bool:
    """Whether a signal handler is the one `owned` installs (not a launcher's, like submitit's)."""
    return handler is _raise_stopped


@contextmanager
def owned(grace: float = STOP_GRACE_SECONDS) -> Iterator[None]:
    """While the block runs, SIGTERM/SIGHUP (and SIGUSR1/SIGUSR2 where no launcher handles them)
    stop it as an exception; when it ends, however it ends, the processes started inside it are
    ended with their trees."""
    with owned_children(grace):
        taken = STOP_SIGNALS + tuple(number for number in CLUSTER_SIGNALS
                                     if signal.getsignal(number) == signal.SIG_DFL)
        previous = {number: signal.signal(number, _raise_stopped) for number in taken}
        try:
            yield
        finally:  # before the children are ended, so that a second signal cannot cut it short
            for number, handler in previous.items():
                signal.signal(number, handler)


@contextmanager
def owned_children(grace: float = STOP_GRACE_SECONDS) -> Iterator[None]:
    """The processes started inside the block (and their orphans) end with it."""
    import psutil

    me = psutil.Process()
    before = {child.pid for child in me.children(recursive=True)}
    try:
        yield
    finally:
        end_started(me, before, grace)


def end_started(me, before: set[int], grace: float) -> None:
    """SIGTERM to every descendant started since `before`, a bounded wait, then SIGKILL."""
    import psutil

    for _ in range(3):  # killing a parent may hand us its orphans: look again
        started = [child for child in me.children(recursive=True) if child.pid not in before]
        if not started:
            return
        log.info("stopping %d process(es) this command started; waiting up to %.0f s",
                 len(started), grace)
        for child in started:
            try:
                child.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(started, timeout=grace)
        for child in alive:
            log.warning("process %d did not stop within %.0f s: killing it", child.pid, grace)
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
