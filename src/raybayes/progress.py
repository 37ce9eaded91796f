"""Progress bars on the driver (rich)."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["ChainProgress", "LossProgress", "ModelProgress", "progress_lines"]


class ChainProgress:
    """One bar per chain: iterations done of warmup + sampling, phase, divergences.

    When stderr is not a terminal (a log file, CI), it prints a plain status line
    at most every ``log_every_s`` seconds instead of redrawing bars.
    """

    def __init__(
        self, num_chains: int, total_per_chain: int, enabled: bool = True, log_every_s=30.0
    ):
        self.enabled = enabled
        if not enabled:
            return
        console = Console(file=sys.stderr)
        self._plain = not console.is_terminal
        if self._plain:
            import time

            self._time = time.monotonic
            self._last = self._time()
            self._start = self._last
            self._every = log_every_s
            self._state = {c: (0, total_per_chain, "warmup", 0) for c in range(num_chains)}
            return
        self._progress = Progress(
            TextColumn("[bold]chain {task.fields[chain]:>3}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[phase]:<8} div {task.fields[divergences]:>4}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._tasks = [
            self._progress.add_task(
                "", total=total_per_chain, chain=c, phase="warmup", divergences=0
            )
            for c in range(num_chains)
        ]
        self._progress.start()

    def update(self, chain_id: int, completed: int, phase: str, divergences: int, total=None):
        if self.enabled and self._plain:
            old = self._state[chain_id]
            self._state[chain_id] = (completed, total or old[1], phase, divergences)
            now = self._time()
            if now - self._last >= self._every:
                self._last = now
                done = sum(v[0] for v in self._state.values())
                todo = sum(v[1] for v in self._state.values())
                phases = sorted({v[2] for v in self._state.values()})
                div = sum(v[3] for v in self._state.values())
                print(
                    f"[{now - self._start:6.0f} s] chains: {done}/{todo} iterations "
                    f"({100 * done / max(todo, 1):.0f}%), phase {'/'.join(phases)}, "
                    f"divergences {div}",
                    file=sys.stderr,
                    flush=True,
                )
            return
        if self.enabled:
            self._progress.update(
                self._tasks[chain_id],
                completed=completed,
                phase=phase,
                divergences=divergences,
                total=total,
            )

    def close(self):
        if self.enabled and not self._plain:
            self._progress.stop()


class LossProgress:
    """One bar of optimizer steps with the current loss (and extra fields).

    When stderr is not a terminal it prints a plain line at most every
    ``log_every_s`` seconds instead.
    """

    def __init__(self, total: int, label: str = "SVI", enabled=True, log_every_s=30.0):
        import time

        self.enabled = enabled
        if not enabled:
            return
        console = Console(file=sys.stderr)
        self._plain = not console.is_terminal
        self._time, self._label, self._every = time.monotonic, label, log_every_s
        self._start = self._last = self._time()
        self._total = total
        if self._plain:
            return
        self._progress = Progress(
            TextColumn(f"[bold]{label}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:>12.6g} {task.fields[extra]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._task = self._progress.add_task("", total=total, loss=float("nan"), extra="")
        self._progress.start()

    def update(self, completed: int, loss: float, extra: str = ""):
        if not self.enabled:
            return
        if self._plain:
            now = self._time()
            if now - self._last >= self._every:
                self._last = now
                print(
                    f"[{now - self._start:6.0f} s] {self._label}: step {completed}/"
                    f"{self._total}, loss {loss:.6g} {extra}",
                    file=sys.stderr,
                    flush=True,
                )
            return
        self._progress.update(self._task, completed=completed, loss=loss, extra=extra)

    def close(self):
        if self.enabled and not self._plain:
            self._progress.stop()


class ModelProgress:
    """One bar of independent models done: ok and failed counts, models/s, time left.

    When stderr is not a terminal it prints a plain line at most every
    ``log_every_s`` seconds instead.

    Args:
        total: models in the job.
        done: models already done (an earlier run) when the bar starts.
        enabled: draw nothing when ``False``.
        log_every_s: seconds between plain lines.
    """

    def __init__(self, total: int, done: int = 0, enabled: bool = True, log_every_s=30.0):
        import time

        self.enabled = enabled
        if not enabled:
            return
        self._time, self._every, self._total, self._done0 = (
            time.monotonic, log_every_s, total, done)
        self._start = self._last = self._time()
        console = Console(file=sys.stderr)
        self._plain = not console.is_terminal
        if self._plain:
            return
        self._progress = Progress(
            TextColumn("[bold]models"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("ok {task.fields[ok]} failed {task.fields[failed]}"),
            TextColumn("{task.fields[rate]:.2f} models/s"),
            TimeRemainingColumn(),
            console=console,
        )
        self._task = self._progress.add_task(
            "", total=total, completed=done, ok=done, failed=0, rate=0.0)
        self._progress.start()

    def update(self, done: int, ok: int, failed: int):
        if not self.enabled:
            return
        now = self._time()
        rate = (done - self._done0) / max(now - self._start, 1e-9)
        if self._plain:
            if now - self._last >= self._every:
                self._last = now
                print(f"[{now - self._start:6.0f} s] models: {done}/{self._total} "
                      f"(ok {ok}, failed {failed}), {rate:.2f} models/s",
                      file=sys.stderr, flush=True)
            return
        self._progress.update(self._task, completed=done, ok=ok, failed=failed, rate=rate)

    def close(self):
        if self.enabled and not self._plain:
            self._progress.stop()


def progress_lines(enabled: bool, logger_name: str = "raybayes"):
    """A function that reports one line of an optimizer's progress.

    Every line is logged at INFO on the logger ``logger_name``; with ``enabled`` it
    is also printed to stderr (flushed), for runs watched in a terminal or a log.

    Args:
        enabled: also print to stderr.
        logger_name: the :mod:`logging` logger's name.

    Returns:
        ``emit(line: str) -> None``.
    """
    import logging

    logger = logging.getLogger(logger_name)

    def emit(line: str) -> None:
        logger.info(line)
        if enabled:
            print(line, file=sys.stderr, flush=True)

    return emit
