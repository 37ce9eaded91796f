"""Checkpoints and streamed draws of chain-parallel MCMC.

Layout of a checkpoint directory::

    run.json                      the run's configuration (checked on resume)
    chain-000/state.npz           chain state (adaptation state included) + counters
    chain-000/draws-000000.parquet  draws and sample stats of sampling chunk 0
    ...

Chain states are arrays and plain metadata (:mod:`raybayes.checkpoint`), never
pickles: loading a checkpoint cannot run code. Every file is written atomically
(temporary file + rename). A chunk's draws are
written before the state that counts them, so a crash between the two leaves a file
that the resumed run simply rewrites, byte for byte.

Draws land on disk as they arrive: :func:`load_draws` returns the InferenceData of
the run so far at any moment, while the run goes on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raybayes.checkpoint import load_checkpoint, open_run, save_checkpoint
from raybayes.io import atomic_path

__all__ = ["DrawStore", "load_draws"]


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return value


class DrawStore:
    """Reads and writes one run's checkpoint directory."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    # -- run configuration -------------------------------------------------------
    #: The settings that must match for a run to resume (see ``sample``).
    RESUME_KEYS = (
        "model", "data", "num_chains", "num_warmup", "num_samples", "chunk_size",
        "seed", "kernel", "init_params", "cross_chain_adaptation", "key_stream",
        "target_ess", "target_rhat", "target_var_names", "num_shards", "partition",
        "low_rank_mass",
    )

    def open(self, config: dict[str, Any], overwrite: bool = False) -> bool:
        """Create the directory or check it belongs to the same run.

        Args:
            config: the run's settings (``RESUME_KEYS`` and what ``load_draws``
                reads: ``dims``, ``coords``).
            overwrite: delete the folder's checkpoint (``run.json``, ``chain-*``)
                first.

        Returns:
            True if a previous run's state exists (the run resumes).

        Raises:
            ConfigurationError: the directory holds a run with another configuration
                (each change named; see :func:`raybayes.checkpoint.open_run`).
        """
        config = {k: _jsonable(v) for k, v in config.items()}
        return open_run(
            self.directory, config, keys=self.RESUME_KEYS, at_least=("target_ess",),
            at_most=("target_rhat",), overwrite=overwrite,
            checkpoint_files=("chain-*",),
        )

    def config(self) -> dict:
        return json.loads((self.directory / "run.json").read_text())

    def _chain_dir(self, chain_id: int) -> Path:
        d = self.directory / f"chain-{chain_id:03d}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    # -- chains --------------------------------------------------------------------
    def write_chunk(self, chain_id: int, index: int, draws: dict, stats: dict) -> None:
        """Write chunk ``index`` of a chain's draws (atomically, as Parquet)."""
        columns, shapes = {}, {}
        for name, value in {**draws, **{f"__stat__{k}": v for k, v in stats.items()}}.items():
            value = np.asarray(value)
            shapes[name] = list(value.shape[1:])
            flat = value.reshape(value.shape[0], -1)
            if flat.shape[1] == 1 and not shapes[name]:
                columns[name] = pa.array(flat[:, 0])
            else:
                columns[name] = pa.FixedSizeListArray.from_arrays(
                    pa.array(flat.reshape(-1)), flat.shape[1]
                )
        table = pa.table(columns).replace_schema_metadata({"shapes": json.dumps(shapes)})
        path = self._chain_dir(chain_id) / f"draws-{index:06d}.parquet"
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)

    def write_state(self, chain_id: int, record: dict) -> None:
        """Write a chain's state and counters (atomically)."""
        save_checkpoint(self._chain_dir(chain_id) / "state.npz", record)

    def read_state(self, chain_id: int) -> dict | None:
        path = self.directory / f"chain-{chain_id:03d}" / "state.npz"
        return load_checkpoint(path, legacy_name="state.pkl")

    def read_chunks(self, chain_id: int, num_chunks: int) -> tuple[list[dict], list[dict]]:
        """Read the first ``num_chunks`` chunks of a chain: ``(draws, stats)`` lists."""
        draws, stats = [], []
        for k in range(num_chunks):
            path = self.directory / f"chain-{chain_id:03d}" / f"draws-{k:06d}.parquet"
            table = pq.read_table(path)
            shapes = json.loads(table.schema.metadata[b"shapes"])
            d, s = {}, {}
            for name in table.column_names:
                col = table.column(name).combine_chunks()
                if pa.types.is_fixed_size_list(col.type):
                    value = col.flatten().to_numpy(zero_copy_only=False)
                else:
                    value = col.to_numpy(zero_copy_only=False)
                value = value.reshape((len(table), *shapes[name]))
                if name.startswith("__stat__"):
                    s[name[len("__stat__"):]] = value
                else:
                    d[name] = value
            draws.append(d)
            stats.append(s)
        return draws, stats


def load_draws(checkpoint_dir: str | Path):
    """The InferenceData of a run so far, while it runs or after it stopped.

    Chains are cut to the number of draws of the shortest chain that has any, so
    the result is rectangular.

    Args:
        checkpoint_dir: the ``checkpoint_dir`` given to :func:`raybayes.sample`.

    Returns:
        ``arviz.InferenceData`` (``posterior`` and ``sample_stats``), or ``None``
        if no chain has finished a sampling chunk yet.

    Raises:
        ConfigurationError: the folder holds chain states of the old pickle format
            (``state.pkl``), which are never loaded: loading a pickle can run code.
    """
    from raybayes.results import to_inference_data

    store = DrawStore(checkpoint_dir)
    config = store.config()
    per_chain = []
    for c in range(config["num_chains"]):
        rec = store.read_state(c)
        if rec and rec["num_chunks"] > 0:
            per_chain.append(store.read_chunks(c, rec["num_chunks"]))
    if not per_chain:
        return None
    cat = [
        ({k: np.concatenate([d[k] for d in draws]) for k in draws[0]},
         {k: np.concatenate([s[k] for s in stats]) for k in stats[0]})
        for draws, stats in per_chain
    ]
    n = min(len(next(iter(d.values()))) for d, _ in cat)
    posterior = {k: np.stack([d[k][:n] for d, _ in cat]) for k in cat[0][0]}
    sample_stats = {k: np.stack([s[k][:n] for _, s in cat]) for k in cat[0][1]}
    coords = {k: np.asarray(v) for k, v in config.get("coords", {}).items()}
    return to_inference_data(
        posterior, sample_stats, dims=config.get("dims"), coords=coords,
        attrs={"inference_library": "raybayes", "partial": True},
    )
