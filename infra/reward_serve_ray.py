"""`rmflow serve-rm --replicas N`: the same reward server as a Ray Serve deployment, for RL jobs that
need more than one process or machine.

Each replica builds the server of `reward_server.py` (its own model holder, dynamic batcher,
back-pressure and metrics) through `serve.ingress` with a builder function, so the routes, the
batching per replica and the alias following (every replica re-reads the alias and swaps on its
own) are the same code as the single-process server. Ray Serve's proxy listens on `host:port` and
spreads requests over the replicas; `/health` and `/metrics` answer for the replica that got the
request (`replica` names it). One GPU per replica when the cluster has one per replica, else CPU
with `torch_threads` (default: the replica's one CPU). RAY_ADDRESS joins a cluster; without it a
local Ray runtime is started and stopped with the command.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Any, Callable

from rmflow.infra.reward_server import ModelHolder, ServerOptions, create_app

APP_NAME = "rmflow-reward"
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "RMFLOW_HOME")  # where each replica finds the registry


def app_builder(uri: str, options: ServerOptions, torch_threads: int) -> Callable[[], Any]:
    """A function Ray Serve calls on each replica to build its ASGI app (the model loads in the
    app's lifespan, on the replica)."""

    def build():
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        holder = ModelHolder(uri, backoff_s=options.refresh_s, download_root=options.download_root, dtype=options.dtype)
        return create_app(holder, options)

    return build


def deploy(uri: str, host: str, port: int, options: ServerOptions, replicas: int, torch_threads: int = 0) -> None:
    """On the Ray runtime this process joined, starts Serve's proxy on host:port and runs `replicas`
    replicas; returns once every replica has loaded the model and is healthy."""
    import ray
    from ray import serve

    gpus = ray.cluster_resources().get("GPU", 0)
    per_replica = {"num_gpus": 1, "num_cpus": 1} if gpus >= replicas else {"num_cpus": 1}
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    serve.start(http_options={"host": host, "port": port})
    deployment = serve.deployment(
        serve.ingress(app_builder(uri, options, torch_threads or (0 if "num_gpus" in per_replica else 1)))(),
        name="reward-model", num_replicas=replicas,
        # the replica's own queue bounds the work (503 beyond max_queue); Ray's default of 5 would cap each batch at 5 requests
        max_ongoing_requests=max(8, min(options.max_queue, 1000)),
        ray_actor_options={**per_replica, "runtime_env": {"env_vars": env}})
    serve.run(deployment.bind(), name=APP_NAME, route_prefix="/")


def serve_replicas(uri: str, host: str, port: int, options: ServerOptions, replicas: int, torch_threads: int = 0) -> None:
    """Joins (or starts) Ray, `deploy`, then serve until interrupted (Ctrl-C, or SIGTERM from the
    moment Ray is up), then remove the application and, for a local runtime, Ray with it."""
    import ray
    from ray import serve

    from rmflow.infra.ray_train import init_ray

    try:
        init_ray(None)
        # at once, not after the replicas loaded the model (minutes for a large one): ray.init leaves
        # its core worker's fatal-signal handler on SIGTERM, which aborts the process (exit 134)
        # before the application is removed (on a shared cluster it would keep running)
        signal.signal(signal.SIGTERM, _interrupt)
        deploy(uri, host, port, options, replicas, torch_threads)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second stop must not cut the clean-up short
        try:
            if ray.is_initialized():  # else Ray never came up, and Serve's clean-up would start (or join) a runtime of its own
                if os.environ.get("RAY_ADDRESS"):
                    serve.delete(APP_NAME)  # a shared cluster keeps Serve for others
                else:
                    serve.shutdown()
        finally:
            ray.shutdown()


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt
