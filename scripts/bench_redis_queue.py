"""Queue operations per second through the request protocol (enqueue, pick, finish: the Lua
scripts and round trips a request costs) on one Redis server against a 3-master Redis Cluster,
both Debian's redis-server 7 on loopback. Usage: python scripts/bench_redis_queue.py [requests] [concurrency]"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared import config, redis_conn  # noqa: E402
from shared.generation import GenRequest  # noqa: E402
from shared.request_protocol import PoolQueue  # noqa: E402
from tests.redis_servers import REDIS_SERVER, Cluster, Deployment, _listening, _wait  # noqa: E402
from llamaship.stack import free_port  # noqa: E402

BUDGET = 1 << 40


async def run(settings: config.Settings, n: int, concurrency: int) -> dict[str, float]:
    r = redis_conn.connect(settings)
    await r.flushdb()
    pools = ["cpu", "cuda"]  # two pools: on the cluster, two slots (usually two masters)
    out = {}
    t0 = time.perf_counter()

    async def enqueue(worker: int):
        q = {p: PoolQueue(r, p) for p in pools}
        for i in range(worker, n, concurrency):
            await q[pools[i % 2]].enqueue(GenRequest(f"r{i}", "m", "p", 4, tenant=f"t{i % 8}"), cost=8,
                                          max_depth=n, tenant_max=n)

    await asyncio.gather(*(enqueue(w) for w in range(concurrency)))
    out["enqueue/s"] = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    done = 0

    async def serve(worker: int):
        nonlocal done
        q = {p: PoolQueue(r, p) for p in pools}
        while done < n:
            picked = await q[pools[worker % 2]].pick(f"w{worker}", BUDGET, BUDGET, {"m": 1})
            if picked is None:
                if done >= n:
                    return
                await asyncio.sleep(0.001)
                continue
            await q[pools[worker % 2]].finish(picked.entry, f"w{worker}")
            done += 1

    await asyncio.wait_for(asyncio.gather(*(serve(w) for w in range(concurrency))), 300)
    out["pick+finish/s"] = n / (time.perf_counter() - t0)
    await redis_conn.close(r)
    return out


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 4000
    concurrency = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    with Deployment("bench-single") as single:
        port = free_port()
        single.server(port)
        _wait(lambda: _listening(port), "redis-server")
        s = config.resolve(config.REDIS, {"redis_url": f"redis://127.0.0.1:{port}/0"}, env={})
        print("one server      ", {k: round(v) for k, v in asyncio.run(run(s, n, concurrency)).items()})
    with Cluster() as cluster:
        s = config.resolve(config.REDIS, {"redis_cluster_nodes": cluster.nodes}, env={})
        print("3-master cluster", {k: round(v) for k, v in asyncio.run(run(s, n, concurrency)).items()})
    print(subprocess.run([REDIS_SERVER, "--version"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
