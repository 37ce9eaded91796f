"""Stop a checkpointed run at a chosen chain record, as a killed driver would."""

from __future__ import annotations

import pytest


def interrupted_then_resumed(monkeypatch, run, stop_after):
    """``run()`` stopped (KeyboardInterrupt) after the first chain record for which
    ``stop_after(record)`` holds is on disk, then ``run()`` again.

    Returns ``(record, result)``: the record the run stopped at (a copy) and what
    the resumed ``run()`` returned."""
    from raybayes.mcmc.store import DrawStore

    real = DrawStore.write_state
    stopped = []

    def write_then_stop(self, chain_id, record):
        real(self, chain_id, record)
        if not stopped and stop_after(record):
            stopped.append(dict(record))
            raise KeyboardInterrupt

    monkeypatch.setattr(DrawStore, "write_state", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(DrawStore, "write_state", real)
    return stopped[0], run()
