"""Distributed logistic regression against scikit-learn, and a gradient pass against
the memory-bandwidth bound, in one run.

    python benchmarks/bench_logistic.py                  # 2,000,000 x 100 float32
    python benchmarks/bench_logistic.py --rows 20000     # quick smoke run

Well-conditioned design: raybayes (Ray shard workers, L-BFGS) against
``sklearn.linear_model.LogisticRegression(solver="lbfgs")`` with the same ``C`` and
``tol``; both final objectives are computed by the same float64 function and
compared with a tight Newton optimum. Ill-conditioned design (Hessian condition
number about 1e4): L-BFGS against distributed Newton, and scikit-learn.

Four raybayes timings, each against scikit-learn's in the same run:

- cold, default (``LogisticRegression().fit(X, y)``, ``backend="auto"``): what a
  user's one-shot call costs, everything included. On one machine without
  ``num_workers`` this runs in-process: no Ray start, no shard placement.
- cold on Ray, everything included (``num_workers=W``: ``ray.init``, placing the
  shards, starting the workers, the fit, the shutdown); ``--skip-cold-ray`` skips it.
- cold on a running Ray instance: validation, placing the shards and starting the
  workers, but not ``ray.init`` (timed separately).
- warm: data that ``ShardedGLMData`` already placed, in-process and on Ray workers.

    python benchmarks/bench_logistic.py --rows 500000 --skip-ill   # a loaded machine
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import threading
import time
import warnings

import numpy as np


def make_data(n, d, seed, ill_conditioned=False):
    """float32 features and 0/1 labels; built in chunks to bound float64 temporaries."""
    rng = np.random.default_rng(seed)
    X = np.empty((n, d), dtype=np.float32)
    y = np.empty(n, dtype=np.float32)
    w = rng.normal(scale=1.0 / np.sqrt(d), size=d)
    scales = np.logspace(0, -2, d) if ill_conditioned else np.ones(d)
    step = 100_000
    for a in range(0, n, step):
        b = min(n, a + step)
        Z = rng.standard_normal((b - a, d), dtype=np.float32)
        if ill_conditioned:
            Z[:, 1:] = 0.7 * Z[:, :1] + 0.3 * Z[:, 1:]  # correlated columns
        Z *= scales.astype(np.float32)
        X[a:b] = Z
        z = Z.astype(np.float64) @ (w / scales) + 0.25
        y[a:b] = rng.random(b - a) < 1 / (1 + np.exp(-z))
    return X, y


def objective(X, y, coef, intercept, C):
    """sklearn's objective, C * sum nll + 0.5 ||coef||^2, in float64, in chunks."""
    total = 0.0
    step = 100_000
    coef = np.asarray(coef, dtype=np.float64).ravel()
    for a in range(0, X.shape[0], step):
        z = X[a : a + step].astype(np.float64) @ coef + float(np.ravel(intercept)[0])
        total += float(np.sum(np.logaddexp(0.0, z) - y[a : a + step] * z))
    return C * total + 0.5 * float(coef @ coef)


def _load():
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def copy_bandwidth(X, repeats=3):
    """Bytes of X per second for a NumPy copy, on 1 thread and on 2 threads."""
    dst = np.empty_like(X)
    t1 = best_of(lambda: np.copyto(dst, X), repeats)
    half = X.shape[0] // 2

    def two_threads():
        parts = [(slice(0, half)), (slice(half, None))]
        ts = [threading.Thread(target=np.copyto, args=(dst[s], X[s])) for s in parts]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    t2 = best_of(two_threads, repeats)
    return X.nbytes / t1, X.nbytes / t2


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--features", type=int, default=100)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--C", type=float, default=1.0)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="warm raybayes fits and scikit-learn fits, each timed this many times "
        "(the first and the median are printed)",
    )
    p.add_argument(
        "--skip-ill", action="store_true", help="skip the ill-conditioned case"
    )
    p.add_argument(
        "--skip-cold-ray",
        action="store_true",
        help="skip the cold fit that starts and stops its own Ray instance",
    )
    args = p.parse_args(argv)

    import jax
    import ray
    import scipy
    import sklearn
    from sklearn.linear_model import LogisticRegression as SkLogReg

    import raybayes
    from raybayes.backends import RayBackend
    from raybayes.glm import LogisticRegression, ShardedGLMData

    n, d, C, tol = args.rows, args.features, args.C, args.tol
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, scipy "
        f"{scipy.__version__}, scikit-learn {sklearn.__version__}, ray "
        f"{ray.__version__}, jax {jax.__version__}, raybayes {raybayes.__version__}"
    )
    print(f"machine: {platform.machine()}, CPUs visible: {os.cpu_count()}")
    print("load average (1, 5, 15 min) at start: " + _load())
    print(f"data: {n:,} x {d} float32, C={C}, tol={tol}, workers={args.workers}")

    t = time.perf_counter()
    X, y = make_data(n, d, seed=0)
    print(
        f"generated well-conditioned data in {time.perf_counter() - t:.1f} s; "
        f"X is {X.nbytes / 1e9:.3f} GB"
    )

    # --- memory-bandwidth bound ---------------------------------------------------
    bw1, bw2 = copy_bandwidth(X)
    bound1, bound2 = X.nbytes / bw1, X.nbytes / bw2
    print(
        f"\ncopy bandwidth: {bw1 / 1e9:.1f} GB/s (1 thread), {bw2 / 1e9:.1f} GB/s "
        f"(2 threads) -> one read of X: >= {bound1 * 1e3:.1f} ms (1 thread), "
        f">= {bound2 * 1e3:.1f} ms (2 threads)"
    )

    # --- cold fits, everything included (before any Ray instance runs) ---------------
    def sk_fit():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return SkLogReg(C=C, l1_ratio=0.0, tol=tol, solver="lbfgs").fit(X, y)

    def auto_fit():
        return LogisticRegression(C=C, tol=tol, standard_errors=False).fit(X, y)

    # Interleaved, so that both see the same load.
    sk_cold, auto_cold = [], []
    for _ in range(max(1, args.repeats)):
        t = time.perf_counter()
        skl = sk_fit()
        sk_cold.append(time.perf_counter() - t)
        t = time.perf_counter()
        auto = auto_fit()
        auto_cold.append(time.perf_counter() - t)
    sk_cold_s, auto_cold_s = float(np.median(sk_cold)), float(np.median(auto_cold))
    print(
        f"\ncold, default backend ({auto.backend_} x {auto.num_workers_}): median "
        f"{auto_cold_s:.2f} s of {len(auto_cold)} "
        f"({', '.join(f'{v:.2f}' for v in auto_cold)}; setup {auto.setup_s_:.2f} s, "
        f"optimize {auto.optimize_s_:.2f} s); {auto.n_iter_[0]} iterations"
    )
    print(
        f"scikit-learn, same loop: median {sk_cold_s:.2f} s "
        f"({', '.join(f'{v:.2f}' for v in sk_cold)}); {skl.n_iter_[0]} iterations"
    )
    f_auto = objective(X, y, auto.coef_, auto.intercept_, C)
    f_skl = objective(X, y, skl.coef_, skl.intercept_, C)
    print(
        f"  ratio cold default / scikit-learn: {auto_cold_s / sk_cold_s:.2f}x  "
        f"(objective rel. diff {abs(f_auto - f_skl) / f_skl:.1e})"
    )
    if not args.skip_cold_ray:
        t = time.perf_counter()
        ray_cold = LogisticRegression(
            C=C, tol=tol, num_workers=args.workers, standard_errors=False
        ).fit(X, y)
        ray_cold_s = time.perf_counter() - t
        print(
            f"cold on Ray, everything included ({ray_cold.backend_} x "
            f"{ray_cold.num_workers_}): {ray_cold_s:.2f} s = ray.init "
            f"{ray_cold.backend_start_s_:.2f} s + setup {ray_cold.setup_s_:.2f} s + "
            f"optimize {ray_cold.optimize_s_:.2f} s + shutdown; "
            f"{ray_cold_s / sk_cold_s:.2f}x scikit-learn"
        )

    # --- warm in-process ---------------------------------------------------------
    with ShardedGLMData(X, y, "logistic", backend="local") as local_data:
        local_warm = []
        for _ in range(max(1, args.repeats)):
            t = time.perf_counter()
            LogisticRegression(C=C, tol=tol, standard_errors=False).fit(local_data)
            local_warm.append(time.perf_counter() - t)
    local_warm_s = float(np.median(local_warm))
    print(
        f"warm in-process: median {local_warm_s:.2f} s "
        f"({', '.join(f'{v:.2f}' for v in local_warm)}); "
        f"{local_warm_s / sk_cold_s:.2f}x scikit-learn"
    )

    # --- Ray start-up (excluded from the fit times below) ------------------------
    t = time.perf_counter()
    backend = RayBackend(num_cpus=args.workers).start()
    ray_start = time.perf_counter() - t
    print(f"Ray start-up (ray.init): {ray_start:.2f} s  [not included in fit times]")

    rows = []
    try:
        # --- cold fit: validate + place shards + start workers + optimize -----------
        t = time.perf_counter()
        cold = LogisticRegression(
            C=C,
            tol=tol,
            num_workers=args.workers,
            backend=backend,
            standard_errors=False,
        ).fit(X, y)
        cold_s = time.perf_counter() - t
        print(
            f"\nraybayes cold fit: {cold_s:.2f} s = setup {cold.setup_s_:.2f} s "
            f"(validate, put shards, start {args.workers} workers) + optimize "
            f"{cold.optimize_s_:.2f} s; {cold.n_iter_[0]} iterations, "
            f"{cold.num_passes_} passes"
        )

        # --- warm: data already on running workers ----------------------------------
        t = time.perf_counter()
        data = ShardedGLMData(
            X, y, "logistic", num_workers=args.workers, backend=backend
        )
        place_s = time.perf_counter() - t
        try:
            warm_times, opt_times = [], []
            for _ in range(max(1, args.repeats)):
                t = time.perf_counter()
                warm = LogisticRegression(C=C, tol=tol, standard_errors=False).fit(data)
                warm_times.append(time.perf_counter() - t)
                opt_times.append(warm.optimize_s_)
            warm_s = float(np.median(warm_times))
            print(
                f"raybayes warm fit (ShardedGLMData placed in {place_s:.2f} s): "
                f"median {warm_s:.2f} s of {len(warm_times)} "
                f"({', '.join(f'{v:.2f}' for v in warm_times)}; optimizer part "
                f"{', '.join(f'{v:.2f}' for v in opt_times)}); "
                f"{warm.n_iter_[0]} iterations, {warm.num_passes_} passes"
            )

            coef = np.r_[warm.coef_.ravel(), warm.intercept_]
            obj = data.objective
            grad_s = best_of(lambda: obj.evaluate(coef), 7)
            loss_s = best_of(lambda: obj.evaluate(coef, need_grad=False), 7)
            hess_s = best_of(lambda: obj.evaluate(coef, need_hess=True), 2)
            print(
                f"\none distributed gradient pass ({args.workers} workers): "
                f"{grad_s * 1e3:.1f} ms; loss only {loss_s * 1e3:.1f} ms; "
                f"with d x d Hessian {hess_s * 1e3:.0f} ms"
            )
            print(
                f"  ratio to the bound: {grad_s / bound1:.2f}x (1-thread copy), "
                f"{grad_s / bound2:.2f}x (2-thread copy)   [target <= 2x]"
            )
            from raybayes.glm import GLMShard

            shard = GLMShard(X, y, "logistic")
            one_s = best_of(lambda: shard.evaluate(coef), 3)
            print(
                f"  same pass in-process on 1 core: {one_s * 1e3:.1f} ms "
                f"({one_s / bound1:.2f}x the 1-thread bound)"
            )

            t = time.perf_counter()
            newton_ref = LogisticRegression(
                C=C, solver="newton", tol=1e-9, standard_errors=True
            ).fit(data)
            ref_s = time.perf_counter() - t
        finally:
            data.close()

        # --- scikit-learn ------------------------------------------------------------
        sk_times = []
        for _ in range(max(1, args.repeats)):
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                skl = SkLogReg(C=C, l1_ratio=0.0, tol=tol, solver="lbfgs").fit(X, y)
            sk_times.append(time.perf_counter() - t)
        sk_s = float(np.median(sk_times))
        print(
            f"\nscikit-learn LogisticRegression(solver='lbfgs'): median {sk_s:.2f} s "
            f"of {len(sk_times)} ({', '.join(f'{v:.2f}' for v in sk_times)}); "
            f"{skl.n_iter_[0]} iterations"
        )

        f_ref = objective(X, y, newton_ref.coef_, newton_ref.intercept_, C)
        f_sk = objective(X, y, skl.coef_, skl.intercept_, C)
        f_cold = objective(X, y, cold.coef_, cold.intercept_, C)
        f_warm = objective(X, y, warm.coef_, warm.intercept_, C)
        print("\nfinal objective C*sum(nll) + ||w||^2/2 (same float64 function):")
        print(
            f"  optimum (raybayes Newton, tol 1e-9, {ref_s:.2f} s incl. Laplace SEs): "
            f"{f_ref:.10g}"
        )
        for name, f in (
            ("scikit-learn", f_sk),
            ("raybayes cold", f_cold),
            ("raybayes warm", f_warm),
        ):
            print(
                f"  {name:14s} {f:.10g}  "
                f"(rel. gap to optimum {(f - f_ref) / f_ref:.1e})"
            )
        print(
            f"  |raybayes - sklearn| / sklearn = {abs(f_warm - f_sk) / f_sk:.1e}"
            "   [target <= 1e-6]"
        )
        print(
            f"\ntime ratio raybayes / scikit-learn: cold {cold_s / sk_s:.2f}x, "
            f"warm {warm_s / sk_s:.2f}x (medians; first fits "
            f"{warm_times[0] / sk_times[0]:.2f}x)   "
            "[target <= 0.67x; Ray start-up excluded]"
        )
        print(
            f"\nsummary (medians; scikit-learn {sk_cold_s:.2f} s in the cold loop, "
            f"{sk_s:.2f} s later): cold default {auto_cold_s / sk_cold_s:.2f}x, warm "
            f"in-process {local_warm_s / sk_cold_s:.2f}x, cold on running Ray "
            f"{cold_s / sk_s:.2f}x, warm Ray {warm_s / sk_s:.2f}x"
        )
        rows.append(("well", cold_s, warm_s, sk_s))

        if args.skip_ill:
            return
        # --- ill-conditioned design --------------------------------------------------
        del X, y
        X, y = make_data(n, d, seed=1, ill_conditioned=True)
        with ShardedGLMData(
            X, y, "logistic", num_workers=args.workers, backend=backend
        ) as data:
            H = LogisticRegression(C=C, solver="newton", tol=1e-9).fit(data)
            cond = np.linalg.cond(np.linalg.inv(H.covariance_))
            print(f"\nill-conditioned design: Hessian condition number {cond:.1e}")
            fits = {}
            for solver in ("lbfgs", "newton"):
                t = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    m = LogisticRegression(
                        C=C, tol=tol, solver=solver, standard_errors=False
                    ).fit(data)
                fits[solver] = (m, time.perf_counter() - t)
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            skl = SkLogReg(C=C, l1_ratio=0.0, tol=tol, solver="lbfgs").fit(X, y)
        sk_ill = time.perf_counter() - t
        f_ref = objective(X, y, H.coef_, H.intercept_, C)
        print(f"  optimum (Newton, tol 1e-9): {f_ref:.10g}")
        for name, (m, s) in fits.items():
            f = objective(X, y, m.coef_, m.intercept_, C)
            print(
                f"  raybayes {name:6s} (warm): {s:6.2f} s, {m.n_iter_[0]:3d} "
                f"iterations, converged={m.converged_}, "
                f"rel. gap {(f - f_ref) / f_ref:.1e}"
            )
        f = objective(X, y, skl.coef_, skl.intercept_, C)
        print(
            f"  scikit-learn lbfgs    : {sk_ill:6.2f} s, {skl.n_iter_[0]:3d} "
            f"iterations, rel. gap {(f - f_ref) / f_ref:.1e}"
        )
        print(
            f"  time ratio raybayes newton / scikit-learn: "
            f"{fits['newton'][1] / sk_ill:.2f}x"
        )
    finally:
        backend.shutdown()
        print("load average (1, 5, 15 min) at end: " + _load())


if __name__ == "__main__":
    sys.exit(main())
