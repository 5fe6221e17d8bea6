"""`shears serve | worker`: the server's subcommands (the client's are in shears.client.cli)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

# serve flag -> Settings field; flags left out fall back to SHEARS_* variables, then defaults.
_SERVE_FLAGS: list[tuple[str, str, dict[str, Any]]] = [
    ("--host", "host", {"help": "address to bind (default 127.0.0.1; others need --token)"}),
    ("--port", "port", {"type": int}),
    ("--data-dir", "data_dir", {"type": Path, "help": "store, artifacts, uploads (default ./.shears)"}),
    ("--store", "store_url", {"help": "SQLAlchemy URL (default sqlite:///<data-dir>/shears.db)"}),
    ("--executor", "executor", {"choices": ["local", "ray"], "help": "default local"}),
    ("--ray-address", "ray_address", {"help": "Ray job submission address (default http://127.0.0.1:8265)"}),
    ("--ray-python", "ray_python", {"help": "Python with shears on the Ray nodes (default python)"}),
    ("--ray-gpus-per-job", "ray_gpus_per_job", {"type": float, "help": "default 1"}),
    ("--ray-cpus-per-job", "ray_cpus_per_job", {"type": float, "help": "default 1"}),
    ("--artifacts", "artifacts_url", {"help": "fsspec URL for artifacts, e.g. s3://bucket/shears/"}),
    ("--max-concurrent-jobs", "max_concurrent_jobs", {"type": int, "help": "default: GPUs, or 1 without"}),
    ("--queue-cap", "queue_cap", {"type": int}),
    ("--upload-max-bytes", "upload_max_bytes", {"type": int}),
    ("--upload-quota-bytes", "upload_quota_bytes", {"type": int}),
    ("--max-attempts", "max_attempts", {"type": int}),
    ("--lease-seconds", "lease_seconds", {"type": float}),
    ("--heartbeat-seconds", "heartbeat_seconds", {"type": float}),
    ("--cancel-grace-seconds", "cancel_grace_seconds", {"type": float}),
    ("--min-free-disk-bytes", "min_free_disk_bytes", {"type": int}),
    ("--model-dir", "model_dirs", {"type": Path, "action": "append", "help": "allow local models here"}),
    ("--text-dir", "text_dirs", {"type": Path, "action": "append", "help": "allow local text files here"}),
    ("--cache-dir", "cache_dir", {"type": Path}),
    ("--vllm-python", "vllm_python", {"type": Path, "help": "Python with vLLM, for verify_runtimes"}),
    ("--worker-nice", "worker_nice", {"type": int, "help": "niceness added to workers (default 0)"}),
    (
        "--checkpoint-interval-seconds",
        "checkpoint_interval_seconds",
        {"type": float, "help": "least seconds between a job's checkpoints (default 0: every block)"},
    ),
    ("--log-level", "log_level", {"choices": ["critical", "error", "warning", "info", "debug"]}),
]


def register(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="run the job server (SQLite store + local executor by default)")
    for flag, _, kwargs in _SERVE_FLAGS:
        serve.add_argument(flag, default=None, **kwargs)
    serve.add_argument(
        "--token", default=None, help="bearer token (prefer env SHEARS_TOKEN: flags show in ps)"
    )
    serve.add_argument("--allow-pickle", action="store_true", default=None)
    serve.add_argument("--trust-remote-code", action="store_true", default=None)
    serve.set_defaults(func=_serve)

    worker = sub.add_parser("worker", help="(internal) run one job attempt; started by the server")
    worker.add_argument("job")
    worker.add_argument("--attempt", type=int)
    worker.set_defaults(func=_worker)


def _serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from shears.server.app import create_app
    from shears.server.settings import Settings

    given = {field: getattr(args, flag[2:].replace("-", "_")) for flag, field, _ in _SERVE_FLAGS}
    given |= {
        "token": args.token,
        "allow_pickle": args.allow_pickle,
        "trust_remote_code": args.trust_remote_code,
    }
    settings = Settings(**{k: v for k, v in given.items() if v is not None})
    problem = settings.startup_problem()
    if problem:
        print(f"shears serve: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=5,
        access_log=settings.log_level == "debug",
    )
    return 0


def _worker(args: argparse.Namespace) -> int:
    from shears.server.settings import Settings
    from shears.server.worker import run

    return run(args.job, args.attempt, Settings())
