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

__all__ = ["ChainProgress"]


class ChainProgress:
    """One bar per chain: iterations done of warmup + sampling, phase, divergences."""

    def __init__(self, num_chains: int, total_per_chain: int, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        self._progress = Progress(
            TextColumn("[bold]chain {task.fields[chain]:>3}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[phase]:<8} div {task.fields[divergences]:>4}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(file=sys.stderr),
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
        if self.enabled:
            self._progress.update(
                self._tasks[chain_id],
                completed=completed,
                phase=phase,
                divergences=divergences,
                total=total,
            )

    def close(self):
        if self.enabled:
            self._progress.stop()
