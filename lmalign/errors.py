"""User errors: one `error:` line per problem, exit status 2, no traceback (docs/design.md,
Errors and exit codes)."""

from __future__ import annotations

import sys

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C


class UserError(Exception):
    """A problem the user can fix (config, inputs, environment). Carries every problem found."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


def problem(key: str, value: object, what: str, allowed: str, fix: str) -> str:
    """The one shape of a problem line: key, value received, what is wrong, what is allowed, fix."""
    return f"{key}={value!r}: {what}; allowed: {allowed}; fix: {fix}"


def report(problems: list[str]) -> None:
    for line in problems:
        flat = " ".join(line.split())  # one line per problem, whatever the source message held
        print(f"error: {flat}", file=sys.stderr)


class TrainingStopped(Exception):
    """Training stopped on a signal (preemption, time limit) after saving a checkpoint: exit 1
    with one line saying how to resume, no traceback."""

    def __init__(self, message: str, signal_number: int | None = None):
        super().__init__(message)
        self.signal_number = signal_number  # what stopped it, for a cluster launcher to requeue


class Stopped(BaseException):
    """SIGTERM, SIGHUP, SIGUSR1 or SIGUSR2 outside training: raised in the main thread (as
    Ctrl-C raises KeyboardInterrupt), so that every `finally` runs; the command exits 128 + the
    signal."""

    def __init__(self, signal_number: int):
        import signal

        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number


class JobFailed(Exception):
    """A sweep job that failed on a cluster: one line naming the job and its log (the traceback
    is in that log)."""
