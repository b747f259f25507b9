"""`rmflow bench serving`: `rmflow serve-rm` vs `mlflow models serve`, same registered model, same
machine, same run.

The model: a reward model on `--backbone` (default `minilm`, rmflow's offline default), registered
in a temporary MLflow registry. Each server gets `--seconds` of closed-loop load at 1, 8 and 32
concurrent clients; every request scores one (prompt, response) pair (what an RL trainer sends per
sample), drawn from synthetic prompts. Reported: requests/s, p50 and p99 latency. rmflow batches
concurrent requests (dynamic batching); MLflow's server scores each request on its own.

One JSON line per (server, clients), then one JSON object with the table.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from rmcore.config import ModelConfig
from rmcore.model import RewardModel, load_tokenizer, resolve_backbone, write_reward_stats
from rmcore.synthetic import synthetic_items
from rmflow.infra.process import free_port, wait_healthy

NAME = "bench-serving"


def load(url: str, make_body, clients: int, seconds: float) -> dict[str, float]:
    """`clients` closed-loop clients (each sends its next request when the last is answered) on one
    asyncio loop with aiohttp: one process, little CPU per request, so that on a small box the load
    generator takes as little as possible from the server it measures (the same for every server)."""
    return asyncio.run(_load(url, make_body, clients, seconds))


async def _load(url: str, make_body, clients: int, seconds: float) -> dict[str, float]:
    import aiohttp

    latencies: list[float] = []
    errors = [0]
    stop = time.monotonic() + seconds

    async def worker(session: aiohttp.ClientSession, n: int) -> None:
        k = n
        while time.monotonic() < stop:
            t = time.perf_counter()
            async with session.post(url, data=json.dumps(make_body(k)), headers={"Content-Type": "application/json"}) as r:
                await r.read()
                ok = r.status == 200
            latencies.append(time.perf_counter() - t) if ok else errors.__setitem__(0, errors[0] + 1)
            k += clients

    start = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients), timeout=aiohttp.ClientTimeout(60)) as session:
        await asyncio.gather(*(worker(session, n) for n in range(clients)))
    wall = time.monotonic() - start
    lat = np.array(latencies) * 1000
    return {"requests_per_s": len(lat) / wall, "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "requests": len(lat), "errors": errors[0]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="minilm")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--servers", default="serve-rm,serve-rm-bf16,ray,mlflow", help="Comma list of serve-rm, serve-rm-bf16, ray, mlflow.")
    p.add_argument("--replicas", type=int, default=2, help="Ray Serve replicas in the `ray` row.")
    args = p.parse_args(argv)
    items = synthetic_items(256, 4, seed=7)
    pairs = [(i.prompt, r) for i in items for r in i.responses]
    bin_dir = Path(sys.executable).parent
    rows = []
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "RMFLOW_HOME": home, "MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db",
               "PATH": f"{bin_dir}:{os.environ['PATH']}"}
        os.environ.update({k: env[k] for k in ("RMFLOW_HOME", "MLFLOW_TRACKING_URI")})
        from rmflow.infra.mlflow_client import configure_mlflow
        from rmflow.tasks.register import register_model

        model_dir = Path(home) / "model"
        backbone = resolve_backbone(args.backbone)
        RewardModel.from_backbone(ModelConfig(backbone=args.backbone, max_length=args.max_length)).save_pretrained(
            model_dir, load_tokenizer(backbone))
        write_reward_stats(model_dir, 0.0, 1.0, 1)
        version = register_model(NAME, model_dir).version
        configure_mlflow().set_registered_model_alias(NAME, "champion", version)
        rm_cmd = [str(bin_dir / "rmflow"), "serve-rm", "--model", f"models:/{NAME}@champion", "--port", "{port}"]
        score_body = lambda k: {"prompt": [pairs[k % len(pairs)][0]], "response": [pairs[k % len(pairs)][1]]}  # noqa: E731
        servers = {
            "rmflow serve-rm": (rm_cmd, "/health", "/score", score_body),
            "rmflow serve-rm --dtype bfloat16": (rm_cmd + ["--dtype", "bfloat16"], "/health", "/score", score_body),
            f"rmflow serve-rm --replicas {args.replicas} (Ray Serve)": (rm_cmd + ["--replicas", str(args.replicas)], "/health", "/score",
                                                                        score_body),
            "mlflow models serve": ([str(bin_dir / "mlflow"), "models", "serve", "-m", f"models:/{NAME}/{version}", "--env-manager",
                                     "local", "--host", "127.0.0.1", "--port", "{port}"], "/ping", "/invocations",
                                    lambda k: {"dataframe_split": {"columns": ["prompt", "response"], "data": [list(pairs[k % len(pairs)])]}}),
        }
        chosen = [s.strip() for s in args.servers.split(",")]
        keys = {"serve-rm": "rmflow serve-rm", "serve-rm-bf16": "rmflow serve-rm --dtype bfloat16",
                "ray": f"rmflow serve-rm --replicas {args.replicas} (Ray Serve)", "mlflow": "mlflow models serve"}
        servers = {keys[c]: servers[keys[c]] for c in chosen}
        for name, (cmd, health, path, body) in servers.items():
            port = free_port(18900)
            proc = subprocess.Popen([c.format(port=port) for c in cmd], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
            try:
                url = f"http://127.0.0.1:{port}"
                wait_healthy(url + health, 180, alive=lambda: proc.poll() is None)
                load(url + path, body, 4, 3)  # warm-up
                for clients in [int(c) for c in args.clients.split(",")]:
                    row = {"server": name, "clients": clients, **load(url + path, body, clients, args.seconds)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            finally:
                proc.terminate()
                proc.wait(30)
    table = ["| server | clients | requests/s | p50 ms | p99 ms |", "|---|---:|---:|---:|---:|"]
    table += [f"| {r['server']} | {r['clients']} | {r['requests_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |" for r in rows]
    print("\n".join(table), file=sys.stderr)
    result = {"backbone": args.backbone, "max_length": args.max_length, "seconds": args.seconds, "rows": rows, "table": "\n".join(table)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
