"""Distributed MAP + Laplace on the hierarchical elasticity model vs NumPyro's peers.

Simulates ``--categories x --products x --weeks`` rows with known elasticities
(:func:`raybayes.datasets.simulate_elasticity`) and, in one run, times

* raybayes: plan -> distributed MAP -> arrowhead Laplace (``--workers`` shard
  workers on ``--backend``), draws in the constrained space. The MAP is
  ``--method newton-cg`` (default: vector-free L-BFGS warm-up to ``--tol``, then
  trust-region Newton-CG steps on Hessian-vector products, preconditioned by a
  kept arrowhead Hessian, to ``--gtol``), ``--method newton`` (the same warm-up,
  then trust-region Newton steps on a full arrowhead Hessian per step) or
  ``--method lbfgs`` (driver-held L-BFGS-B to ``--lbfgs-tol``, at most
  ``--max-iter`` iterations, then the Newton polish inside ``laplace``);
* the tuned single-process peer of the MAP (``--skip-jax-peer`` to leave out):
  the same NumPyro potential (unconstrained, Jacobians included, from
  ``numpyro.infer.util.initialize_model``) minimised by ``optax.lbfgs`` (memory
  10, zoom line search) with the whole loop in one ``jax.lax.while_loop`` under
  one jit, float64, from the same start (zeros), to the same ``--gtol`` or
  ``--peer-max-iter`` iterations. It prints its time, iterations, loss and the
  largest difference of the unconstrained parameters from ours, and the time
  ratio;
* NumPyro ``AutoLaplaceApproximation`` (SVI with Adam to its MAP, then the dense
  Laplace posterior) and SVI with ``AutoNormal`` (Trace_ELBO, Adam), unless
  ``--skip-peers``;

and prints the RMSE of the posterior-mean product elasticities against the truth,
the wall time of each, and the ratios. All use the same non-centred model.

Usage:
    python benchmarks/bench_map_laplace.py --products 10000 --weeks 156 --workers 2
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import numpy as np
import numpyro
from numpyro.handlers import reparam
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoLaplaceApproximation, AutoNormal
from numpyro.infer.reparam import LocScaleReparam

from raybayes.datasets.elasticity import prepare_elasticity_data, simulate_elasticity
from raybayes.distributed import ShardedObjective
from raybayes.models.elasticity import elasticity_model
from raybayes.optim import (
    NewtonObjective,
    find_map,
    find_map_newton,
    find_map_newton_cg,
    laplace,
)
from raybayes.plan import plan

MODEL = reparam(
    elasticity_model, config={"gamma": LocScaleReparam(0), "delta": LocScaleReparam(0)}
)


def rmse(a, b):
    return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


def run_raybayes(kwargs, args):
    start = time.perf_counter()
    chosen = plan(MODEL, kwargs, num_shards=args.workers)
    print(chosen)
    objective_class = ShardedObjective if args.method == "lbfgs" else NewtonObjective
    with objective_class(
        MODEL,
        kwargs,
        partition=chosen.partition,
        num_shards=chosen.num_shards,
        backend=args.backend,
    ) as objective:
        setup_s = time.perf_counter() - start
        if args.method != "lbfgs":
            run = find_map_newton if args.method == "newton" else find_map_newton_cg
            result = run(
                objective, tol=args.tol, gtol=args.gtol, warmup_steps=args.max_iter,
                profile_steps=args.profile_steps, progress_bar=args.progress,
            )
        else:
            result = find_map(
                objective, tol=args.lbfgs_tol, max_steps=args.max_iter,
                progress_bar=args.progress,
            )
        lap = laplace(
            objective,
            result,
            num_samples=args.draws,
            seed=0,
            progress_bar=args.progress,
        )
        check = None
        if args.check_hessian and lap.hessian_reused:
            # the Laplace approximation again with a Hessian built at the MAP
            t0 = time.perf_counter()
            fresh = laplace(objective, result, num_samples=args.draws, seed=0,
                            hessian_reuse_tol=0.0)
            check = dict(time_s=time.perf_counter() - t0, lap=fresh)
    total = time.perf_counter() - start - (check["time_s"] if check else 0.0)
    beta = lap.idata.posterior["beta"].values.reshape(args.draws, -1).mean(0)
    if check is not None:
        fresh = check["lap"]
        draws = [x.idata.posterior["beta"].values.reshape(args.draws, -1)
                 for x in (lap, fresh)]
        var = [np.diag(x.global_covariance) for x in (lap, fresh)]
        check.update(
            sd_globals=float(np.max(np.abs(np.sqrt(var[0] / var[1]) - 1))),
            sd_beta=float(np.max(np.abs(draws[0].std(0) / draws[1].std(0) - 1))),
            mean_beta=float(np.max(np.abs(draws[0].mean(0) - draws[1].mean(0)))),
            log_ml=lap.log_marginal_likelihood - fresh.log_marginal_likelihood,
            hvp=fresh.hessian_vector_products,
        )
    return dict(
        time_s=total,
        setup_s=setup_s,
        map_s=result.time_s,
        laplace_s=lap.time_s,
        iterations=result.num_iterations,
        status=result.status,
        params={k: np.asarray(v) for k, v in lap.map.params.items()},
        loss=lap.map.loss,
        grad_norm=lap.map.grad_norm,
        hessians=getattr(result, "num_hessians", 0),
        warmup=getattr(result, "warmup_steps", 0),
        newton_s=getattr(result, "newton_time_s", float("nan")),
        beta=beta,
        map_beta=np.asarray(result.params["beta"]),
        log_ml=lap.log_marginal_likelihood,
        polish=lap.map.message,
        hvp=lap.hessian_vector_products,
        cg_steps=getattr(result, "num_cg_steps", None),
        timings=getattr(result, "timings_s", None),
        round_trips=getattr(result, "round_trips", None),
        num_global=objective.num_global,
        size=objective.size,
        reused=lap.hessian_reused,
        distance=getattr(result, "kept_hessian_distance", float("nan")),
        check=check,
    )


def run_jax_lbfgs(kwargs, gtol, max_iter, history_size=10):
    """The tuned single-process peer: optax L-BFGS on the NumPyro potential, the
    whole optimisation in one jit (``lax.while_loop``), float64, from zeros.

    Returns a dict with ``time_s`` (first call: compilation included),
    ``run_s`` (a second call, compiled), ``iterations``, ``loss``, ``grad_norm``
    and ``params`` (constrained values of the sites at its optimum).
    """
    import jax.numpy as jnp
    import optax
    from jax.flatten_util import ravel_pytree
    from numpyro.infer.util import initialize_model

    with jax.enable_x64(True):
        kw = {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v)
              for k, v in kwargs.items()}
        info = initialize_model(jax.random.PRNGKey(0), MODEL, model_kwargs=kw,
                                dynamic_args=False)
        z0 = jax.tree.map(jnp.zeros_like, info.param_info.z)
        flat0, unravel = ravel_pytree(z0)
        potential = info.potential_fn

        def fun(x):
            return potential(unravel(x))

        opt = optax.lbfgs(memory_size=history_size)
        value_and_grad = optax.value_and_grad_from_state(fun)

        @jax.jit
        def solve(x0):
            def body(carry):
                x, state, _, _, it = carry
                value, grad = value_and_grad(x, state=state)
                updates, state = opt.update(
                    grad, state, x, value=value, grad=grad, value_fn=fun
                )
                x = optax.apply_updates(x, updates)
                return x, state, value, jnp.max(jnp.abs(grad)), it + 1

            def cond(carry):
                _, _, _, gmax, it = carry
                return (gmax > gtol) & (it < max_iter)

            init = (x0, opt.init(x0), jnp.inf, jnp.inf, 0)
            return jax.lax.while_loop(cond, body, init)

        t0 = time.perf_counter()
        x, _, _, _, it = jax.block_until_ready(solve(flat0))
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        jax.block_until_ready(solve(flat0))
        run_s = time.perf_counter() - t0
        value, grad = jax.value_and_grad(fun)(x)
        params = jax.tree.map(np.asarray, info.postprocess_fn(unravel(x)))
        return dict(time_s=first, run_s=run_s, iterations=int(it),
                    loss=float(value), grad_norm=float(jnp.max(jnp.abs(grad))),
                    params=params)


def run_svi(kwargs, guide_cls, steps, draws, lr, laplace_hessian=True):
    start = time.perf_counter()
    guide = guide_cls(MODEL)
    svi = SVI(MODEL, guide, numpyro.optim.Adam(lr), Trace_ELBO())
    res = svi.run(jax.random.PRNGKey(0), steps, progress_bar=False, **kwargs)
    if guide_cls is AutoLaplaceApproximation and not laplace_hessian:
        # The dense Hessian (jacfwd over all parameters and rows) does not fit in
        # memory here; report the MAP that SVI reached instead.
        post = {k: v[None] for k, v in guide.median(res.params).items()}
        draws = 1
    else:
        post = guide.sample_posterior(
            jax.random.PRNGKey(1), res.params, sample_shape=(draws,)
        )
    if "beta" not in post:
        pred = numpyro.infer.Predictive(MODEL, post, return_sites=["beta"])
        post = pred(jax.random.PRNGKey(2), **{**kwargs, "units": None})
    beta = np.asarray(post["beta"]).reshape(draws, -1).mean(0)
    return dict(
        time_s=time.perf_counter() - start, beta=beta, final_loss=float(res.losses[-1])
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--categories", type=int, default=10)
    parser.add_argument("--products", type=int, default=10_000)
    parser.add_argument("--weeks", type=int, default=156)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--backend", default="ray")
    parser.add_argument(
        "--method", choices=("newton-cg", "newton", "lbfgs"), default="newton-cg"
    )
    parser.add_argument("--tol", type=float, default=1e-8,
                        help="relative decrease ending the L-BFGS warm-up (newton)")
    parser.add_argument("--lbfgs-tol", type=float, default=1e-13,
                        help="relative decrease ending L-BFGS (--method lbfgs)")
    parser.add_argument("--gtol", type=float, default=1e-5)
    parser.add_argument("--profile-steps", type=int, default=5,
                        help="Newton steps of the locals given the globals (newton)")
    parser.add_argument("--max-iter", type=int, default=3000)
    parser.add_argument("--peer-max-iter", type=int, default=20_000)
    parser.add_argument("--skip-jax-peer", action="store_true")
    parser.add_argument("--draws", type=int, default=500)
    parser.add_argument("--svi-steps", type=int, default=3000)
    parser.add_argument("--svi-lr", type=float, default=0.01)
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--skip-ours", action="store_true")
    parser.add_argument(
        "--no-autolaplace-hessian",
        action="store_true",
        help="report AutoLaplaceApproximation's SVI MAP only (its dense Hessian "
        "needs num_params x num_rows memory)",
    )
    parser.add_argument("--progress", action="store_true")
    parser.add_argument(
        "--check-hessian",
        action="store_true",
        help="when the Laplace step reused the Newton-CG Hessian, run it again "
        "with a Hessian built at the MAP and print the differences (not timed "
        "in the total)",
    )
    args = parser.parse_args()

    df, truth = simulate_elasticity(args.categories, args.products, args.weeks, seed=0)
    data = prepare_elasticity_data(
        df, product_cols=("product",), category_col="category"
    )
    kwargs = data.model_kwargs()
    true_beta = truth["beta"][data.products["product"].to_numpy()]
    print(
        f"data: {args.categories} categories x {args.products} products x {args.weeks} "
        f"weeks = {data.num_obs:,} rows; {platform.processor() or platform.machine()}, "
        f"jax {jax.__version__}, numpyro {numpyro.__version__}"
    )
    baseline = rmse(truth["beta_category"][data.category_of_product], true_beta)
    print(f"RMSE of predicting each product by its true category mean: {baseline:.4f}")

    if args.skip_ours:
        ours = dict(time_s=float("nan"), beta=np.full_like(true_beta, np.nan))
    else:
        ours = run_raybayes(kwargs, args)
    if not args.skip_ours:
        print(
            f"raybayes MAP+Laplace ({args.workers} workers, {args.backend}): "
            f"{ours['time_s']:.1f} s (setup {ours['setup_s']:.1f}, MAP {ours['map_s']:.1f} s / "
            f"{ours['iterations']} it [{ours['status']}] of which Newton "
            f"{ours['newton_s']:.1f} s with {ours['hessians']} Hessians after "
            f"{ours['warmup']} L-BFGS it, Laplace {ours['laplace_s']:.1f} s); "
            f"G={ours['num_global']}, vector {ours['size']}; RMSE(beta) {rmse(ours['beta'], true_beta):.4f} "
            f"(MAP {rmse(ours['map_beta'], true_beta):.4f}); log p(y) ~ {ours['log_ml']:.1f}"
        )
        print(f"  MAP and Newton polish: {ours['polish']}")
        if ours["reused"]:
            print(
                "  Laplace Hessian: the kept Newton-CG Hessian, built "
                f"{ours['distance']:.2e} posterior sd (its norm) from the MAP"
            )
        else:
            print(
                f"  final Hessian: {ours['hvp']} Hessian-vector products per shard "
                f"for {ours['num_global']} global columns (kept one "
                f"{ours['distance']:.2e} from the MAP)"
            )
        if ours["check"] is not None:
            c = ours["check"]
            print(
                f"  check, Laplace with a Hessian built at the MAP ({c['hvp']} "
                f"products, {c['time_s']:.1f} s, not in the total): largest "
                f"relative difference of the posterior sd: globals "
                f"{c['sd_globals']:.2e}, beta {c['sd_beta']:.2e}; of the beta means "
                f"{c['mean_beta']:.2e}; log p(y) difference {c['log_ml']:.3e}"
            )
        print(f"  optimum: loss {ours['loss']:.10e}, |grad|max {ours['grad_norm']:.2e}")
        if ours["timings"]:
            parts = ", ".join(f"{k} {v:.1f} s" for k, v in ours["timings"].items())
            print(
                f"  Newton-CG: {ours['cg_steps']} Hessian-vector products in CG, "
                f"{ours['round_trips']} round trips; time by part: {parts}"
            )
    if not args.skip_jax_peer:
        peer = run_jax_lbfgs(kwargs, args.gtol, args.peer_max_iter)
        line = (
            f"JAX/optax L-BFGS peer (one jit, float64, 1 process): "
            f"{peer['time_s']:.1f} s with compilation, {peer['run_s']:.1f} s "
            f"compiled; {peer['iterations']} it; "
            f"loss {peer['loss']:.10e}, |grad|max {peer['grad_norm']:.2e}"
        )
        if not args.skip_ours:
            common = sorted(set(peer["params"]) & set(ours["params"]))
            diff = max(
                float(np.max(np.abs(np.ravel(peer["params"][name])
                                    - np.ravel(ours["params"][name]))))
                for name in common
            )
            line += (
                f"; loss - ours {peer['loss'] - ours['loss']:.3e}; max |diff| of the "
                f"constrained sites {diff:.3e}; time ratio peer/raybayes: "
                f"MAP {peer['time_s'] / ours['map_s']:.2f}, "
                f"MAP+Laplace {peer['time_s'] / ours['time_s']:.2f}"
            )
        print(line)
    if args.skip_peers:
        return
    for name, cls in (
        ("AutoLaplaceApproximation", AutoLaplaceApproximation),
        ("SVI AutoNormal", AutoNormal),
    ):
        peer = run_svi(
            kwargs,
            cls,
            args.svi_steps,
            args.draws,
            args.svi_lr,
            laplace_hessian=not args.no_autolaplace_hessian,
        )
        r = rmse(peer["beta"], true_beta)
        print(
            f"NumPyro {name} ({args.svi_steps} Adam steps, lr {args.svi_lr}): "
            f"{peer['time_s']:.1f} s; RMSE(beta) {r:.4f}; "
            f"time ratio peer/raybayes {peer['time_s'] / ours['time_s']:.2f}; "
            f"RMSE ratio peer/raybayes {r / rmse(ours['beta'], true_beta):.2f}"
        )


if __name__ == "__main__":
    main()
