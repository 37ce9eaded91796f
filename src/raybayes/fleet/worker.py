"""The unit of remote work of ``fit_many``: one batch of groups, fitted vectorized.

A :class:`FleetBatchWorker` lives on a worker (a Ray actor, or in-process). For a
batch it reads each group's rows straight from the partitioned Parquet data set
(pyarrow filters on the partition keys, so only that group's files are opened),
validates them (:func:`raybayes.fleet.data.validate_group`), fits all valid groups
at once with :class:`BatchSampler`, writes
each group's outputs atomically and returns small per-group records (status,
error, diagnostics) to the driver. No Ray imports here.
"""

from __future__ import annotations

import importlib.util
import sys
import time
import traceback
from functools import reduce
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raybayes.config import derive_key
from raybayes.errors import ConfigurationError, DataValidationError
from raybayes.fleet import store
from raybayes.fleet.data import dataset_from, validate_group
from raybayes.fleet.sampler import BatchSampler, diagnostics
from raybayes.models.hmm import (
    HMM_REGISTRY,
    hmm_posterior_predictive,
    seasonal_features,
)

__all__ = ["FleetBatchWorker", "resolve_model", "validate_group"]


def resolve_model(model: str):
    """A registry name (``"poisson_hmm"``) or ``"path/to/file.py:function"``.

    Returns:
        ``(model_fn, family)``; ``family`` is ``"poisson"``/``"negbin"`` for registry
        models (posterior predictive available) and ``None`` for user models.

    Raises:
        ConfigurationError: unknown name, missing file or function.
    """
    if callable(model):
        return model, None
    if model in HMM_REGISTRY:
        return HMM_REGISTRY[model]
    if ":" in model:
        path, _, fn_name = model.rpartition(":")
        if not Path(path).is_file():
            raise ConfigurationError(
                f"model={model!r}: file {path!r} does not exist. Pass 'file.py:function'."
            )
        name = f"_raybayes_user_model_{abs(hash(str(Path(path).resolve())))}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        if not hasattr(module, fn_name):
            raise ConfigurationError(f"model={model!r}: {path} defines no {fn_name!r}.")
        return getattr(module, fn_name), None
    raise ConfigurationError(
        f"model={model!r} is not known; use one of {sorted(HMM_REGISTRY)} or "
        "'path/to/file.py:function'."
    )


class FleetBatchWorker:
    """Fits batches of groups of a partitioned data set (held on each worker).

    Args:
        config: the job's settings (a plain dict built by ``fit_many``).
    """

    def __init__(self, config: dict):
        self.config = config
        self.model, self.family = resolve_model(config["model"])
        self._dataset = None
        self._sampler = None

    @property
    def dataset(self):
        if self._dataset is None:
            c = self.config
            self._dataset = dataset_from(c["data"], c["schema"], exclude=c["output_dir"])
        return self._dataset

    def _sampler_for(self):
        if self._sampler is None:
            c = self.config
            kw = {"num_states": c["num_states"]} if self.family else {}
            kw.update(c.get("model_kwargs") or {})
            self._sampler = BatchSampler(
                self.model, kw,
                num_chains=c["num_chains"], num_warmup=c["num_warmup"],
                num_samples=c["num_samples"], target_ess=c["target_ess"],
                target_rhat=c["target_rhat"], max_extensions=c["max_extensions"],
                mass_matrix=c.get("mass_matrix", "laplace"),
            )
        return self._sampler

    def read_group(self, key: dict, files: list[str] | None = None) -> pa.Table:
        """Rows of one group: only ``files`` (its partition's files) when given."""
        expr = reduce(
            lambda a, b: a & b,
            [pc.field(k) == pa.scalar(v) for k, v in key.items()],
        )
        c = self.config
        cols = [c["time_column"], c["value_column"]]
        dataset = self.dataset if files is None else dataset_from(
            c["data"], c["schema"], files=files)
        return dataset.to_table(columns=cols, filter=expr)

    def fit_batch(
        self, batch_id: str, keys: list[dict], files: list | None = None
    ) -> list[dict]:
        """Fit every group of a batch; write outputs; return one record per group.

        A group with bad data gets status ``invalid`` and its error; the others go
        on. An exception in the vectorized fit propagates (the driver retries the
        batch, then its groups one by one).

        Args:
            batch_id: the batch's stable id.
            keys: the groups' keys.
            files: per group, its files relative to the data folder (``None``: read
                the group by filtering the whole data set).
        """
        c = self.config
        start = time.perf_counter()
        records, good = [], []
        files = files or [None] * len(keys)
        for key, group_files in zip(keys, files, strict=True):
            gid = store.group_id(key)
            rec = {"group_id": gid, "key": key, "batch_id": batch_id}
            try:
                t, v, filled = validate_group(
                    self.read_group(key, group_files), c["time_column"], c["value_column"],
                    c["min_points"], c.get("frequency", "1h"))
                rec["num_filled_steps"] = filled
                good.append((rec, t, v))
            except DataValidationError as err:
                rec.update(status="invalid", error=str(err))
            except (pa.ArrowException, OSError, ValueError, TypeError) as err:
                rec.update(status="invalid", error=f"could not read the group's rows: {err}")
            records.append(rec)
        if good:
            self._fit(good)
        elapsed = time.perf_counter() - start
        for rec in records:
            rec["elapsed_s"] = elapsed / max(1, len(records))
        return records

    def _fit(self, good):
        c = self.config
        batch_size = max(c["batch_size"], len(good))
        num_steps = max(len(t) for _, t, _ in good)
        pad = c.get("pad_multiple", 256)
        num_steps = int(np.ceil(num_steps / pad) * pad)
        lanes = list(range(len(good))) + [len(good) - 1] * (batch_size - len(good))
        y = np.zeros((batch_size, num_steps), np.float32)
        mask = np.zeros((batch_size, num_steps), bool)
        cov = None
        if c["seasonality"]:
            cov = np.zeros((batch_size, num_steps, 4 * c["seasonality"]), np.float32)
        keys = []
        for i, g in enumerate(lanes):
            rec, t, v = good[g]
            finite = np.isfinite(v)
            y[i, : len(v)] = np.where(finite, v, 0)
            mask[i, : len(v)] = finite
            if cov is not None:
                cov[i, : len(t)] = seasonal_features(t, c["seasonality"])
            keys.append(derive_key(c["seed"], store.group_seed(rec["group_id"])))
        keys = np.stack([np.asarray(k) for k in keys])
        valid = np.arange(batch_size) < len(good)
        sampler = self._sampler_for()
        if c["method"] == "nuts":
            out = sampler.nuts(keys, y, mask, cov, valid=valid)
        elif c["method"] in ("laplace", "map"):
            out = sampler.laplace(keys, y, mask, cov, num_draws=c["num_samples"] * c["num_chains"])
        else:
            raise ConfigurationError(f"method={c['method']!r}; use 'nuts', 'map' or 'laplace'.")
        if c["method"] == "map":
            _, map_con = sampler.find_map(keys, y, mask, cov)
        for i, (rec, t, v) in enumerate(good):
            draws = out.draws[i]
            diag = diagnostics(draws)
            if c["method"] == "map":
                diag["map"] = [float(x) for k in draws for x in np.ravel(map_con[k][i])]
            n = len(v)
            rec.update(
                status="ok", error=None, attempts=1,
                num_draws=int(out.diverging[i].size),
                num_divergences=int(out.diverging[i].sum()),
                max_r_hat=float(np.nanmax(diag["r_hat"])) if c["method"] == "nuts" else None,
                min_ess_bulk=float(np.nanmin(diag["ess_bulk"])),
                min_ess_tail=float(np.nanmin(diag["ess_tail"])),
                num_gradients=int(out.num_gradients[i]),
                num_restarts=None if out.num_restarts is None else int(out.num_restarts[i]),
                met_target=None if out.met_target is None else bool(out.met_target[i]),
            )
            self._write_outputs(rec, diag, draws, t, v, y[i, :n], mask[i, :n],
                                None if cov is None else cov[i, :n])

    def _user_predictive(self, key, draws, y, mask, cov):
        """Posterior predictive draws ``(D, T)`` of a user model.

        The model is run with ``y=None`` by :class:`numpyro.infer.Predictive` on the
        posterior draws; its observed site (the one that takes ``y``) is returned.

        Raises:
            ConfigurationError: the model has no observed sample site (e.g. it adds
                its likelihood with ``numpyro.factor``), or the draws of that site
                do not have one value per time point.
        """
        import jax.numpy as jnp
        from numpyro.infer import Predictive

        kw = dict(self.config.get("model_kwargs") or {}, mask=jnp.asarray(mask))
        if cov is not None:
            kw["covariates"] = jnp.asarray(cov)
        first = {k: v[0] for k, v in draws.items()}
        y_obs = jnp.asarray(np.where(mask, y, 0.0), jnp.float32)
        sites = _observed_sites(self.model, (y_obs,), kw, first)
        if not sites:
            raise ConfigurationError(
                "the model has no observed sample site (its likelihood is a "
                "numpyro.factor?), so no posterior predictive draws; sample the "
                "observations with numpyro.sample(..., obs=y) when y is None."
            )
        pred = Predictive(self.model, posterior_samples=draws, return_sites=sites[:1])
        y_rep = np.asarray(pred(key, None, **kw)[sites[0]])
        y_rep = y_rep.reshape(y_rep.shape[0], -1)
        if y_rep.shape[1] != len(y):
            raise ConfigurationError(
                f"site {sites[0]!r} has {y_rep.shape[1]} values per draw when y is None, "
                f"not one per time point ({len(y)}); size it from mask when y is None."
            )
        return y_rep

    def _write_outputs(self, rec, diag, draws, t, v, y, mask, cov):
        c = self.config
        out = Path(c["output_dir"])
        sub = store.group_path(rec["key"])
        store.remove_group_outputs(out, rec["key"])  # none of an earlier fit remains
        summary = pa.table(diag)
        summary = summary.append_column(
            "num_divergences", pa.array([rec["num_divergences"]] * summary.num_rows, pa.int64())
        )
        store.atomic_write_parquet(out / "summary" / sub / "part-0.parquet", summary)
        if c["num_predictive_draws"] <= 0:
            return
        flat = {k: val.reshape((-1,) + val.shape[2:]) for k, val in draws.items()}
        total = next(iter(flat.values())).shape[0]
        idx = np.linspace(0, total - 1, c["num_predictive_draws"]).round().astype(int)
        sub_draws = {k: val[idx] for k, val in flat.items()}
        key = derive_key(c["seed"], "predictive", store.group_seed(rec["group_id"]))
        y_in = np.where(mask, y, np.nan).astype(np.float32)
        if self.family is None:
            try:
                y_rep = self._user_predictive(key, sub_draws, y, mask, cov)
            except Exception as err:  # noqa: BLE001 - recorded, the fit is kept
                rec["predictive_error"] = format_error(err)
                return
            probs = np.zeros((len(t), 0))
        else:
            y_rep, probs, _ = hmm_posterior_predictive(
                key, self.family, sub_draws, y_in, cov,
                initial=c.get("initial", "stationary"),
            )
        y_rep, probs = np.asarray(y_rep), np.asarray(probs)
        num_draws, n = y_rep.shape
        ts = pa.array(np.tile(t, num_draws)) if len(t) else pa.array([])
        pred = pa.table({
            "timestamp": ts,
            "draw": pa.array(np.repeat(np.arange(num_draws, dtype=np.int32), n)),
            "y_pred": pa.array(y_rep.reshape(-1)),
        })
        store.atomic_write_parquet(out / "predictive" / sub / "part-0.parquet", pred)
        cols = {"timestamp": pa.array(t), "y": pa.array(v)}
        for k in range(probs.shape[1]):
            cols[f"p_state_{k}"] = pa.array(probs[:, k])
        cols["y_pred_mean"] = pa.array(y_rep.mean(axis=0))
        store.atomic_write_parquet(out / "states" / sub / "part-0.parquet", pa.table(cols))


def _observed_sites(model, args, kwargs, params):
    from numpyro import handlers
    from numpyro.distributions.distribution import Unit

    tr = handlers.trace(handlers.substitute(handlers.seed(model, 0), params))
    tr = tr.get_trace(*args, **kwargs)
    return [  # numpyro.factor sites are observed Unit sites: not observations
        n for n, s in tr.items()
        if s["type"] == "sample" and s.get("is_observed") and not isinstance(s["fn"], Unit)
    ]


def format_error(err: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(err), err)).strip()
