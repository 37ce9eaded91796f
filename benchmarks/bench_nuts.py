"""Chain-parallel NUTS: raybayes (Ray, 2 workers) vs NumPyro parallel and sequential.

The same elasticity model, data, chains, warmup and draws for all three, in one run.
NumPyro's parallel method needs one XLA host device per chain, set before JAX is
imported, so each NumPyro method runs in its own subprocess.

    python benchmarks/bench_nuts.py [--stores 10] [--chains 4] [--warmup 300] [--samples 300]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

PEER = r"""
import json, os, sys, time
method, stores, chains, warmup, samples = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
import numpyro
numpyro.set_host_device_count(chains)
import jax
from numpyro.infer import MCMC, NUTS
from raybayes.datasets import load_orange_juice, prepare_elasticity_data
from raybayes.models import elasticity_model
d = prepare_elasticity_data(load_orange_juice(stores=stores))
t = time.perf_counter()
m = MCMC(NUTS(elasticity_model), num_warmup=warmup, num_samples=samples, num_chains=chains,
         chain_method=method, progress_bar=False)
m.run(jax.random.PRNGKey(0), **d.model_kwargs())
jax.block_until_ready(m.get_samples())
print(json.dumps({"wall_s": time.perf_counter() - t}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stores", type=int, default=10)
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--samples", type=int, default=300)
    a = ap.parse_args()
    args = [str(a.stores), str(a.chains), str(a.warmup), str(a.samples)]
    peers = {}
    for method in ("parallel", "sequential"):
        out = subprocess.run([sys.executable, "-c", PEER, method, *args], capture_output=True,
                             text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        if out.returncode:
            print(out.stderr[-3000:])
            raise SystemExit(1)
        peers[method] = json.loads(out.stdout.strip().splitlines()[-1])["wall_s"]

    import raybayes
    from raybayes.backends import RayBackend
    from raybayes.datasets import load_orange_juice, prepare_elasticity_data
    from raybayes.models import elasticity_model

    d = prepare_elasticity_data(load_orange_juice(stores=a.stores))
    t0 = time.perf_counter()
    with RayBackend(num_cpus=2) as backend:
        t_init = time.perf_counter() - t0
        t = time.perf_counter()
        raybayes.sample(elasticity_model, model_kwargs=d.model_kwargs(), num_chains=a.chains,
                        num_warmup=a.warmup, num_samples=a.samples, seed=0, backend=backend,
                        num_workers=2, progress_bar=False)
        t_rb = time.perf_counter() - t
    print(f"elasticity model: {d.num_obs} rows, {d.num_products} products; "
          f"{a.chains} chains x ({a.warmup} warmup + {a.samples} draws)")
    print(f"NumPyro parallel   : {peers['parallel']:7.1f} s")
    print(f"NumPyro sequential : {peers['sequential']:7.1f} s")
    print(f"raybayes (2 Ray workers, worker start-up and compile included): {t_rb:7.1f} s"
          f"  (+ ray.init {t_init:.1f} s, not included)")
    print(f"ratio raybayes/NumPyro-parallel  : {t_rb / peers['parallel']:.2f} (target <= 1.15)")
    print(f"ratio raybayes/NumPyro-sequential: {t_rb / peers['sequential']:.2f}")


if __name__ == "__main__":
    main()
