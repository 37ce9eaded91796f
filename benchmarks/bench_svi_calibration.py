"""Calibration of 90% credible intervals of product elasticities: SVI, Laplace, NUTS.

Simulates ``--categories x --products x --weeks`` rows with known elasticities
(:func:`raybayes.datasets.simulate_elasticity`), once per seed (``--seeds`` data
sets, seeds ``--seed0``, ``--seed0 + 1``, ...), and fits the same non-centred
``elasticity_model`` to each with four methods:

* ``svi-normal``: ``raybayes.fit_svi``, mean-field guide (``guide="normal"``);
* ``svi-lowrank``: ``raybayes.fit_svi``, low-rank global block
  (``guide="lowrank"``, per-product blocks mean-field);
* ``svi-structured``: ``raybayes.fit_svi``, structured guide
  (``guide="structured"``: full-rank global block, each product's block full-rank
  and linear in the globals);
* ``laplace``: ``raybayes.laplace_approximation`` (distributed L-BFGS MAP, then the
  arrowhead Laplace approximation, draws in the constrained space);
* ``nested-laplace``: ``raybayes.nested_laplace`` (the scales and the
  concentration integrated over a central composite design, the latent field
  Gaussian given them, on the arrowhead system);
* ``nuts``: ``raybayes.sample`` (``--chains`` chains of NUTS on ``--workers``
  workers), the reference.

SVI and Laplace are split over ``--workers`` shards along the products plate (the
planner could split along "times" when there are more weeks than products, so the
products candidate of :func:`raybayes.plan` is passed explicitly). SVI runs all
``--svi-steps`` (no convergence stop) with Adam on a cosine-decay schedule for both
the global and the per-product parameters, using every product each step.

For each method it reports, over the products ``beta_i``:

* coverage: the fraction of products whose true ``beta_i`` lies in the central 90%
  interval (5% and 95% quantiles) of its marginal posterior draws, pooled over the
  seeds, with its binomial Monte Carlo standard error ``sqrt(0.9 * 0.1 / n)``
  (n = products x seeds) and ``z = (coverage - 0.9) / MCSE``, so that a shortfall
  can be told from noise (the products are not independent, so read it as a guide);
* the mean interval width, and its ratio to that of NUTS;
* the RMSE of the posterior mean against the truth (pooled);
* the wall time of the call (mean over seeds; worker start-up, data transfer, JIT
  compilation and final draws included; Ray's own start-up is not) and its ratio
  to NUTS's time. There is no external peer: NUTS is the reference both for the
  calibration and for the time;
* in the notes, the CPU seconds of the benchmark's process during the call (all
  its threads; the whole work with the in-process backend, not Ray workers'): on
  a loaded machine they vary less than the wall time;
* for NUTS, the largest split R-hat (ArviZ, rank-normalised) and the smallest bulk
  ESS of ``beta``, and the number of divergences.

Prints a Markdown table (and one per seed when there are several), and writes it to
``--out`` if given. A method that raises is reported with the end of its traceback
and the others still run.

Usage:
    python benchmarks/bench_svi_calibration.py --products 100 --weeks 52 --backend ray
    python benchmarks/bench_svi_calibration.py --backend local --nuts-backend ray \
        --svi-steps 1500 --warmup 300 --samples 300 --draws 500
    python benchmarks/bench_svi_calibration.py --products 40 --weeks 26 \\
        --svi-steps 300 \\
        --warmup 100 --samples 100 --backend local
    python benchmarks/bench_svi_calibration.py --seeds 3 --out calibration.md
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import traceback
import warnings

import arviz as az
import jax
import numpy as np
import numpyro
import optax

import raybayes
from raybayes.datasets.elasticity import prepare_elasticity_data, simulate_elasticity
from raybayes.models.elasticity import elasticity_model
from raybayes.plan import plan

MODEL = elasticity_model  # already non-centred; not wrapped in reparam again
METHODS = (
    "svi-normal", "svi-lowrank", "svi-structured", "laplace", "nested-laplace", "nuts"
)
GUIDES = {"svi-normal": "normal", "svi-lowrank": "lowrank",
          "svi-structured": "structured"}
LABELS = {
    "svi-normal": "raybayes SVI, mean-field",
    "svi-lowrank": "raybayes SVI, low-rank globals",
    "svi-structured": "raybayes SVI, structured",
    "laplace": "raybayes Laplace",
    "nested-laplace": "raybayes nested Laplace (INLA)",
    "nuts": "NUTS (reference)",
}


def beta_draws(idata):
    """``(num_draws_total, P)`` draws of ``beta`` from an InferenceData's posterior."""
    da = idata.posterior["beta"]
    other = [d for d in da.dims if d not in ("chain", "draw")]
    da = da.transpose("chain", "draw", *other)
    return np.asarray(da.values).reshape(-1, int(np.prod(da.shape[2:])))


def calibration(draws, truth, prob):
    """Per-product hits, widths and posterior means of the central ``prob`` interval."""
    lo, hi = np.quantile(draws, [(1 - prob) / 2, (1 + prob) / 2], axis=0)
    return dict(
        hit=(truth >= lo) & (truth <= hi),
        width=hi - lo,
        err=draws.mean(0) - truth,
    )


def first_line(exc, limit=200):
    text = str(exc)
    return text.splitlines()[0][:limit] if text else ""


def _svi_optimizers(args):
    def make():
        return optax.adam(
            optax.cosine_decay_schedule(
                args.svi_lr, args.svi_steps, alpha=args.svi_alpha
            )
        )

    return make(), make()


def run_method(name, kwargs, part, backend, seed, args):
    """Fit one method; return its InferenceData, wall time and extra notes."""
    start = time.perf_counter()
    cpu_start = time.process_time()
    extra = {}
    if name.startswith("svi-"):
        optimizer, local_optimizer = _svi_optimizers(args)
        res = raybayes.fit_svi(
            MODEL,
            model_kwargs=kwargs,
            num_shards=args.workers,
            partition=part,
            backend=backend,
            guide=GUIDES[name],
            rank=args.rank if name == "svi-lowrank" else None,
            optimizer=optimizer,
            local_optimizer=local_optimizer,
            subsample_size=None,
            num_steps=args.svi_steps,
            tol=None,
            seed=seed,
            num_samples=args.draws,
            progress_bar=False,
        )
        idata = res.idata
        losses = np.asarray(res.losses)
        tail = losses[-min(100, losses.size) :]
        extra["ms_per_step"] = 1e3 * float(res.time_s) / max(int(res.num_steps), 1)
        extra["note"] = (
            f"{int(res.num_steps)} steps: set-up {float(res.setup_s):.1f} s, "
            f"fit {float(res.time_s):.1f} s ({extra['ms_per_step']:.2f} ms/step, "
            "JIT compilation of the step included), "
            f"draws {float(res.draws_s):.1f} s, "
            f"-ELBO (last 100) {tail.mean():.1f}"
        )
    elif name == "laplace":
        res = raybayes.laplace_approximation(
            MODEL,
            model_kwargs=kwargs,
            num_shards=args.workers,
            partition=part,
            backend=backend,
            num_samples=args.draws,
            seed=seed,
            progress_bar=False,
        )
        idata = res.idata
        extra["note"] = (
            f"MAP {res.map.num_iterations} it [{res.map.status}], "
            f"non-PD blocks {res.num_not_positive_definite}"
        )
    elif name == "nested-laplace":
        res = raybayes.nested_laplace(
            MODEL,
            model_kwargs=kwargs,
            num_shards=args.workers,
            partition=part,
            backend=backend,
            num_samples=args.draws,
            seed=seed,
            progress_bar=args.progress,
        )
        idata = res.idata
        t = res.timings
        extra["note"] = (
            f"theta {res.hyperparameters}, {len(res.weights)} design points, "
            f"{res.num_evaluations} evaluations of log p(theta|y) and "
            f"{res.num_gradients} of its gradient: mode "
            f"{t['mode_s']:.1f} s, Hessian {t['hessian_s']:.1f} s, design "
            f"{t['design_s']:.1f} s, draws {t['draws_s']:.1f} s"
        )
    elif name == "nuts":
        idata = raybayes.sample(
            MODEL,
            model_kwargs=kwargs,
            num_chains=args.chains,
            num_warmup=args.warmup,
            num_samples=args.samples,
            seed=seed,
            backend=backend,
            num_workers=args.workers,
            progress_bar=False,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            extra["rhat"] = float(az.rhat(idata, var_names=["beta"])["beta"].max())
            extra["ess"] = float(az.ess(idata, var_names=["beta"])["beta"].min())
        div = int(np.asarray(idata.sample_stats["diverging"]).sum())
        extra["note"] = (
            f"{args.chains} x ({args.warmup} + {args.samples}), "
            f"min bulk ESS(beta) {extra['ess']:.0f}, {div} divergences"
        )
    else:  # pragma: no cover - argparse restricts the names
        raise ValueError(name)
    extra["time_s"] = time.perf_counter() - start
    # CPU seconds of this process (all its threads): with the in-process backend
    # it covers all the work, and it depends less on other processes' load
    extra["cpu_s"] = time.process_time() - cpu_start
    return idata, extra


def table(rows, prob, ref="nuts"):
    """Markdown lines for ``rows``: method -> pooled metrics."""
    head = (
        f"| method | coverage ({prob:.0%}) | MCSE | z | mean width | width / NUTS "
        "| RMSE | time s | time / NUTS | max R-hat |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    ref_row = rows.get(ref)
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {LABELS[name]} | failed: {r['error']} |" + " |" * 8)
            continue
        mcse = np.sqrt(prob * (1 - prob) / r["n"])
        z = (r["coverage"] - prob) / mcse
        wr = tr = "n/a"
        if ref_row is not None and "error" not in ref_row:
            wr = f"{r['width'] / ref_row['width']:.2f}"
            tr = f"{r['time_s'] / ref_row['time_s']:.2f}"
        rhat = f"{r['rhat']:.3f}" if r.get("rhat") is not None else "-"
        lines.append(
            f"| {LABELS[name]} | {r['coverage']:.3f} | {mcse:.3f} | {z:+.1f} "
            f"| {r['width']:.3f} | {wr} | {r['rmse']:.4f} | {r['time_s']:.1f} | {tr} "
            f"| {rhat} |"
        )
    return lines


def pool(results):
    """Pool per-seed calibration dicts of one method."""
    hit = np.concatenate([r["hit"] for r in results])
    width = np.concatenate([r["width"] for r in results])
    err = np.concatenate([r["err"] for r in results])
    rhats = [r["rhat"] for r in results if r.get("rhat") is not None]
    return dict(
        n=hit.size,
        coverage=float(hit.mean()),
        width=float(width.mean()),
        rmse=float(np.sqrt(np.mean(err**2))),
        time_s=float(np.mean([r["time_s"] for r in results])),
        rhat=max(rhats) if rhats else None,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--categories", type=int, default=5)
    parser.add_argument("--products", type=int, default=100)
    parser.add_argument("--weeks", type=int, default=52)
    parser.add_argument("--seeds", type=int, default=1, help="number of data sets")
    parser.add_argument("--seed0", type=int, default=0, help="first data-set seed")
    parser.add_argument("--workers", type=int, default=2, help="shards / NUTS workers")
    parser.add_argument(
        "--backend", default="ray", choices=("ray", "local"), help="SVI and Laplace"
    )
    parser.add_argument(
        "--nuts-backend",
        default=None,
        choices=("ray", "local"),
        help="NUTS (default: --backend)",
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated subset of {', '.join(METHODS)}",
    )
    parser.add_argument("--prob", type=float, default=0.9, help="interval mass")
    parser.add_argument("--draws", type=int, default=1000, help="SVI / Laplace draws")
    parser.add_argument("--svi-steps", type=int, default=3000)
    parser.add_argument("--svi-lr", type=float, default=0.05, help="peak Adam step")
    parser.add_argument(
        "--svi-alpha", type=float, default=0.02, help="final lr / peak lr (cosine)"
    )
    parser.add_argument("--rank", type=int, default=None, help="low-rank guide rank")
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--out", default=None, help="also write the report as Markdown")
    parser.add_argument("--progress", action="store_true", help="nested Laplace lines")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {METHODS}")
    methods = [m for m in METHODS if m in methods]

    lines = []

    def out(line=""):
        print(line, flush=True)
        lines.append(line)

    args.nuts_backend = args.nuts_backend or args.backend
    backends = {"local": "local"}
    ray_init_s = None
    need_ray = ("nuts" in methods and args.nuts_backend == "ray") or (
        any(m != "nuts" for m in methods) and args.backend == "ray"
    )
    if need_ray:
        from raybayes.backends import RayBackend

        t = time.perf_counter()
        backends["ray"] = RayBackend(num_cpus=args.workers).start()
        ray_init_s = time.perf_counter() - t

    per_seed = {m: [] for m in methods}
    errors = {}
    notes = []
    try:
        for seed in range(args.seed0, args.seed0 + args.seeds):
            df, truth = simulate_elasticity(
                args.categories, args.products, args.weeks, seed=seed
            )
            data = prepare_elasticity_data(
                df, product_cols=("product",), category_col="category"
            )
            kwargs = data.model_kwargs()
            true_beta = truth["beta"][data.products["product"].to_numpy()]
            if seed == args.seed0:
                cpu = platform.processor() or platform.machine()
                out(
                    f"data: {args.categories} categories x {args.products} products x "
                    f"{args.weeks} weeks = {data.num_obs:,} rows per data set, "
                    f"{args.seeds} data set(s) (seeds {args.seed0}.."
                    f"{args.seed0 + args.seeds - 1}); {cpu}, "
                    f"{os.cpu_count()} CPU cores; jax {jax.__version__}, "
                    f"numpyro {numpyro.__version__}, arviz {az.__version__}"
                )
                out(
                    f"backend {args.backend} (SVI, Laplace), "
                    f"{args.nuts_backend} (NUTS), "
                    f"{args.workers} workers/shards"
                    + (
                        f" (ray start-up {ray_init_s:.1f} s, in no time below)"
                        if ray_init_s is not None
                        else ""
                    )
                    + f"; SVI: {args.svi_steps} steps, Adam with cosine decay from "
                    f"{args.svi_lr} (alpha {args.svi_alpha}), all products per step, "
                    f"{args.draws} draws; Laplace: {args.draws} draws; NUTS: "
                    f"{args.chains} chains x ({args.warmup} warmup + "
                    f"{args.samples} draws)"
                )
                out()
            chosen = plan(MODEL, kwargs, num_shards=args.workers)
            part = next(c for c in chosen.candidates if c.plate == "products").partition
            for name in methods:
                if name in errors:
                    continue
                try:
                    backend = backends[
                        args.nuts_backend if name == "nuts" else args.backend
                    ]
                    idata, extra = run_method(name, kwargs, part, backend, seed, args)
                except Exception as exc:  # report and go on with the other methods
                    tb = traceback.extract_tb(exc.__traceback__)
                    where = tb[-1] if tb else None
                    errors[name] = f"{type(exc).__name__}: {first_line(exc)}" + (
                        f" ({os.path.relpath(where.filename)}:{where.lineno})"
                        if where
                        else ""
                    )
                    print(traceback.format_exc(), flush=True)
                    continue
                cal = calibration(beta_draws(idata), true_beta, args.prob)
                per_seed[name].append(
                    dict(cal, time_s=extra["time_s"], rhat=extra.get("rhat"),
                         ms_per_step=extra.get("ms_per_step"))
                )
                notes.append(
                    f"seed {seed}, {LABELS[name]}: "
                    f"{extra['time_s']:.1f} s wall, {extra['cpu_s']:.1f} CPU-s of "
                    f"this process; {extra['note']}"
                )
                print(
                    f"  seed {seed} {name}: coverage {cal['hit'].mean():.3f}, width "
                    f"{cal['width'].mean():.3f}, "
                    f"RMSE {np.sqrt(np.mean(cal['err'] ** 2)):.4f}, "
                    f"{extra['time_s']:.1f} s",
                    flush=True,
                )
    finally:
        if "ray" in backends:
            backends["ray"].shutdown()

    n = args.products * args.seeds
    out(
        f"## {args.prob:.0%} central intervals of beta vs the truth, pooled over "
        f"{args.seeds} data set(s) ({n} products; binomial MCSE of a "
        f"{args.prob:.0%} coverage = sqrt({args.prob}*{1 - args.prob:.1f}/{n}) = "
        f"{np.sqrt(args.prob * (1 - args.prob) / n):.3f})"
    )
    out()
    rows = {}
    for name in methods:
        if name in errors:
            rows[name] = {"error": errors[name]}
        elif per_seed[name]:
            rows[name] = pool(per_seed[name])
    for line in table(rows, args.prob):
        out(line)
    out()
    out(
        "time: mean wall time per data set of the whole call (worker start-up, JIT "
        "compilation and draws included); z = (coverage - nominal) / MCSE."
    )
    if args.seeds > 1:
        for i, seed in enumerate(range(args.seed0, args.seed0 + args.seeds)):
            out()
            out(f"### data set seed {seed}")
            out()
            seed_rows = {
                m: (rows[m] if "error" in rows[m] else pool([per_seed[m][i]]))
                for m in rows
                if "error" in rows[m] or len(per_seed[m]) > i
            }
            for line in table(seed_rows, args.prob):
                out(line)
    svi = [m for m in methods if m.startswith("svi-") and per_seed[m]]
    if "svi-normal" in svi and len(svi) > 1:
        base = np.mean([r["ms_per_step"] for r in per_seed["svi-normal"]])
        out()
        out("cost per step (fit time / steps, mean over data sets) against "
            "mean-field:")
        for m in svi:
            ms = np.mean([r["ms_per_step"] for r in per_seed[m]])
            out(f"- {LABELS[m]}: {ms:.2f} ms/step, {ms / base:.2f}x")
    out()
    for note in notes:
        out(f"- {note}")

    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
