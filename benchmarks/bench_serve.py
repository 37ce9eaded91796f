"""Load on ``raybayes serve``: latency and throughput of the aggregate endpoint.

Store: a ``fit_many`` output folder written without fitting
(:func:`raybayes.datasets.fleet_results.simulate_fleet_results`): by default
4 regions x 5 demographics x 50 networks = 1,000 groups, 1,000 hours, 100
predictive draws each, i.e. 10^8 draw-rows. It is written once and reused.

Server: ``raybayes serve`` in its own process (its resident memory is read from
``/proc``). Clients: a bounded asyncio loop of httpx requests to 127.0.0.1, with
1, 8 and 32 concurrent clients. Each request asks for the draw-by-draw sum over
all groups of one region (250 groups) and a one-week window (168 hours), the
region and the window's start drawn at random, so no two requests are alike
(the aggregate reads 250 files x 100 draws x 1,000 hours, keeps 4.2 M rows and
sums them into 16,800 totals).

The server's draws cache (``--cache-mib``, default 1 GiB) holds every group's
decoded draws after the warm-up (one request per region, timed apart); run with
``--cache-mib 0`` for DuckDB reading the files at every request.

Peer: the same aggregate with DuckDB in this process over the store's own views
(``raybayes.fleet.connect_results``: one glob over the hive-partitioned files,
the region and the window in the WHERE clause), no HTTP; the same random
requests, one at a time. The ratio compares the one-client medians.

    python benchmarks/bench_serve.py --out /tmp/serve-store            # full size
    python benchmarks/bench_serve.py --out /tmp/s --networks 5 --hours 400 --requests 20
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import numpy as np

WEEK = timedelta(days=7)


def build_store(out: Path, args) -> float:
    from raybayes.datasets.fleet_results import simulate_fleet_results

    if (out / "manifest.parquet").exists():
        return 0.0
    t0 = time.perf_counter()
    simulate_fleet_results(
        out,
        args.regions,
        args.demographics,
        args.networks,
        num_steps=args.hours,
        num_draws=args.draws,
        seed=0,
        batch_size=50,
    )
    return time.perf_counter() - t0


def rss_mib(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of a process, MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return (
        int(fields["VmRSS"].split()[0]) / 1024,
        int(fields["VmHWM"].split()[0]) / 1024,
    )


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def requests_plan(n, regions, first, hours, seed):
    rng = np.random.default_rng(seed)
    last_start = hours - 24 * 7
    plan = []
    for _ in range(n):
        start = first + timedelta(hours=int(rng.integers(0, last_start + 1)))
        plan.append(
            {
                "region": f"r{rng.integers(0, regions)}",
                "start": start.isoformat(),
                "end": (start + WEEK).isoformat(),
                "interval": "0.9",
            }
        )
    return plan


async def load(url, plan, concurrency):
    latencies = []
    queue = list(plan)
    limits = httpx.Limits(
        max_connections=concurrency, max_keepalive_connections=concurrency
    )
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def worker():
            while queue:
                params = queue.pop()
                t0 = time.perf_counter()
                r = await client.get("/api/aggregate", params=params)
                latencies.append(time.perf_counter() - t0)
                r.raise_for_status()
                body = r.json()
                assert body["num_groups"] > 0 and len(body["series"][0]["mean"]) == 168

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return np.array(latencies), wall


def peer(out: Path, plan):
    """The same aggregates with DuckDB over the store's views, in process, serially."""
    from raybayes.fleet import connect_results

    con = connect_results(out)
    sql = """
        WITH sums AS (
            SELECT timestamp, draw, SUM(y_pred) AS total FROM predictive
            WHERE region = $region AND timestamp >= $start AND timestamp < $end
            GROUP BY timestamp, draw)
        SELECT timestamp, AVG(total), QUANTILE_CONT(total, [0.05, 0.95])
        FROM sums GROUP BY timestamp ORDER BY timestamp"""
    latencies = []
    for p in plan:
        params = {
            "region": p["region"],
            "start": datetime.fromisoformat(p["start"]),
            "end": datetime.fromisoformat(p["end"]),
        }
        t0 = time.perf_counter()
        rows = con.execute(sql, params).fetchall()
        latencies.append(time.perf_counter() - t0)
        assert len(rows) == 168
    return np.array(latencies)


def pct(x, q):
    return 1000 * float(np.quantile(x, q))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="store folder (reused)")
    ap.add_argument("--regions", type=int, default=4)
    ap.add_argument("--demographics", type=int, default=5)
    ap.add_argument("--networks", type=int, default=50)
    ap.add_argument("--hours", type=int, default=1000)
    ap.add_argument("--draws", type=int, default=100)
    ap.add_argument("--requests", type=int, default=200, help="requests per level")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--peer-requests", type=int, default=30)
    ap.add_argument(
        "--cache-mib",
        type=float,
        default=1024,
        help="the server's draws cache (0: every query reads the files)",
    )
    args = ap.parse_args()

    build_s = build_store(args.out, args)
    num_groups = args.regions * args.demographics * args.networks
    rows = num_groups * args.draws * args.hours
    size = sum(p.stat().st_size for p in (args.out / "predictive").rglob("*.parquet"))
    print(
        f"store: {num_groups} groups x {args.draws} draws x {args.hours} hours = "
        f"{rows:.3g} draw-rows, predictive files {size / 2**20:.0f} MiB"
        + (f", written in {build_s:.0f} s" if build_s else " (reused)")
    )
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()}")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "raybayes.cli",
            "serve",
            str(args.out),
            "--port",
            str(port),
            "--cache-mib",
            str(args.cache_mib),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.perf_counter()
        while True:
            try:
                httpx.get(url + "/api/keys", timeout=5).raise_for_status()
                break
            except httpx.TransportError:
                if server.poll() is not None or time.perf_counter() - t0 > 600:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.5)
        print(
            f"server up in {time.perf_counter() - t0:.1f} s; RSS "
            f"{rss_mib(server.pid)[0]:.0f} MiB before any aggregate"
        )
        first = datetime(2024, 1, 1)
        # warm-up, not counted: one request per region (reads every group's file
        # once: file metadata, and the draws cache when it is on)
        warm = [
            {
                "region": f"r{i}",
                "start": first.isoformat(),
                "end": (first + WEEK).isoformat(),
            }
            for i in range(args.regions)
        ]
        lat, wall = asyncio.run(load(url, warm, 1))
        print(
            "warm-up (first request per region, cold): "
            f"{1000 * lat.mean():.0f} ms each; "
            f"RSS {rss_mib(server.pid)[0]:.0f} MiB",
            flush=True,
        )
        results = []
        for c in (int(x) for x in args.concurrency.split(",")):
            plan = requests_plan(args.requests, args.regions, first, args.hours, c)
            cpu0 = cpu_s(server.pid)
            lat, wall = asyncio.run(load(url, plan, c))
            cpu = (cpu_s(server.pid) - cpu0) / len(lat)
            rss, peak = rss_mib(server.pid)
            results.append((c, lat, wall, rss, peak, cpu))
            print(
                f"clients {c:>2}: p50 {pct(lat, 0.5):7.0f} ms  "
                f"p95 {pct(lat, 0.95):7.0f} ms  "
                f"p99 {pct(lat, 0.99):7.0f} ms  {len(lat) / wall:6.2f} req/s  "
                f"server CPU {1000 * cpu:.0f} ms/request  "
                f"RSS {rss:.0f} MiB (peak {peak:.0f})",
                flush=True,
            )
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()

    plan = requests_plan(
        args.peer_requests, args.regions, datetime(2024, 1, 1), args.hours, 7
    )
    peer(args.out, plan[:2])  # warm-up
    cpu0 = time.process_time()
    lat_peer = peer(args.out, plan)
    cpu_peer = (time.process_time() - cpu0) / len(lat_peer)
    one = results[0][1]
    print(
        f"peer (DuckDB over the store's views, in process, 1 client): p50 "
        f"{pct(lat_peer, 0.5):.0f} ms  p95 {pct(lat_peer, 0.95):.0f} ms"
    )
    print(
        f"ratio of one-client medians, served / peer: "
        f"{np.median(one) / np.median(lat_peer):.2f}"
    )
    print(
        "\n| clients | requests | p50 ms | p95 ms | p99 ms | requests/s "
        "| server CPU ms/request | server RSS MiB (peak) |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    for c, lat, wall, rss, peak, cpu in results:
        print(
            f"| {c} | {len(lat)} | {pct(lat, 0.5):.0f} | {pct(lat, 0.95):.0f} | "
            f"{pct(lat, 0.99):.0f} | {len(lat) / wall:.2f} | {1000 * cpu:.0f} | "
            f"{rss:.0f} ({peak:.0f}) |"
        )
    print(
        f"| peer, 1 | {len(lat_peer)} | {pct(lat_peer, 0.5):.0f} "
        f"| {pct(lat_peer, 0.95):.0f} "
        f"| {pct(lat_peer, 0.99):.0f} | {len(lat_peer) / lat_peer.sum():.2f} "
        f"| {1000 * cpu_peer:.0f} (in process) | - |"
    )


if __name__ == "__main__":
    main()
