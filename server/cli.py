"""`shears serve | submit | status | jobs | events | cancel | download | upload | worker | demo`."""

from __future__ import annotations

import argparse
import json
import os
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
    ("--max-attempts", "max_attempts", {"type": int}),
    ("--lease-seconds", "lease_seconds", {"type": float}),
    ("--heartbeat-seconds", "heartbeat_seconds", {"type": float}),
    ("--cancel-grace-seconds", "cancel_grace_seconds", {"type": float}),
    ("--min-free-disk-bytes", "min_free_disk_bytes", {"type": int}),
    ("--model-dir", "model_dirs", {"type": Path, "action": "append", "help": "allow local models here"}),
    ("--text-dir", "text_dirs", {"type": Path, "action": "append", "help": "allow local text files here"}),
    ("--cache-dir", "cache_dir", {"type": Path}),
    ("--worker-nice", "worker_nice", {"type": int, "help": "niceness added to workers (default 0)"}),
    ("--log-level", "log_level", {"choices": ["critical", "error", "warning", "info", "debug"]}),
]


def _client_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=os.environ.get("SHEARS_URL", "http://127.0.0.1:8000"),
        help="server URL (env SHEARS_URL)",
    )
    parser.add_argument(
        "--token", default=os.environ.get("SHEARS_TOKEN"), help="bearer token (env SHEARS_TOKEN)"
    )


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

    submit = sub.add_parser("submit", help="submit a pruning job to a server")
    _client_args(submit)
    submit.add_argument("model", nargs="?", help="built-in alias, hub repo id, or a path the server allows")
    submit.add_argument("--method", choices=["sparsegpt", "wanda", "magnitude"])
    submit.add_argument("--sparsity", type=float, help="implied by an N:M pattern")
    submit.add_argument("--pattern", default="unstructured")
    submit.add_argument("--revision")
    submit.add_argument("--calib", default="builtin", help="builtin | self | hf:... | upload:<id>")
    submit.add_argument("--samples", type=int)
    submit.add_argument("--seqlen", type=int)
    submit.add_argument("--seed", type=int)
    submit.add_argument("--no-eval", action="store_true")
    submit.add_argument("--eval-tokens", type=int)
    submit.add_argument("--formats", help="comma list of: dense, packed")
    submit.add_argument("--benchmark", action="store_true")
    submit.add_argument("--request", type=Path, help="the whole job request as a JSON file")
    submit.add_argument("--idempotency-key")
    submit.add_argument("--wait", action="store_true", help="follow the job until it ends")
    submit.set_defaults(func=_submit)

    status = sub.add_parser("status", help="a job's status")
    _client_args(status)
    status.add_argument("job")
    status.set_defaults(func=_status)

    jobs = sub.add_parser("jobs", help="list jobs, newest first")
    _client_args(jobs)
    jobs.add_argument("--status")
    jobs.add_argument("--limit", type=int, default=20)
    jobs.set_defaults(func=_jobs)

    events = sub.add_parser("events", help="a job's events")
    _client_args(events)
    events.add_argument("job")
    events.add_argument("--after", type=int, default=0)
    events.add_argument("--follow", action="store_true", help="stream until the job ends")
    events.set_defaults(func=_events)

    cancel = sub.add_parser("cancel", help="cancel a queued or running job")
    _client_args(cancel)
    cancel.add_argument("job")
    cancel.set_defaults(func=_cancel)

    download = sub.add_parser("download", help="download a job's artifacts (resumable, checksum-verified)")
    _client_args(download)
    download.add_argument("job")
    download.add_argument("dest", type=Path)
    download.set_defaults(func=_download)

    upload = sub.add_parser("upload", help="upload a calibration file; prints the source to use")
    _client_args(upload)
    upload.add_argument("file", type=Path)
    upload.set_defaults(func=_upload)

    worker = sub.add_parser("worker", help="(internal) run one job attempt; started by the server")
    worker.add_argument("job")
    worker.add_argument("--attempt", type=int)
    worker.set_defaults(func=_worker)

    demo = sub.add_parser("demo", help="start a server, prune the built-in model through it, report")
    demo.add_argument("--model", default="smollm2-135m")
    demo.add_argument("--samples", type=int, default=32)
    demo.add_argument("--seqlen", type=int, default=256)
    demo.add_argument("--eval-tokens", type=int, default=4096)
    demo.add_argument("--keep", type=Path, help="keep the server's data dir here instead of a temporary one")
    demo.set_defaults(func=_demo)


def _serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from server.app import create_app
    from server.settings import Settings

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


def _client(args: argparse.Namespace) -> Any:
    from server.client import ShearsClient

    return ShearsClient(args.url, token=args.token)


def _print(data: Any) -> None:
    print(json.dumps(data, indent=2))


def _request_from_args(args: argparse.Namespace) -> dict[str, Any]:
    if args.request:
        return json.loads(args.request.read_text())
    if not args.model or not args.method:
        raise SystemExit("shears submit: give MODEL and --method (or --request FILE)")
    request: dict[str, Any] = {"model": args.model, "method": args.method, "pattern": args.pattern}
    sparsity = args.sparsity
    if sparsity is None and ":" in args.pattern:
        n, m = (int(x) for x in args.pattern.split(":"))
        sparsity = 1 - n / m
    if sparsity is None:
        raise SystemExit("shears submit: give --sparsity (or an N:M --pattern)")
    request["sparsity"] = sparsity
    calibration = {"source": args.calib, "samples": args.samples, "seqlen": args.seqlen, "seed": args.seed}
    request["calibration"] = {k: v for k, v in calibration.items() if v is not None}
    evaluation = {"enabled": not args.no_eval, "max_tokens": args.eval_tokens}
    request["evaluation"] = {k: v for k, v in evaluation.items() if v is not None}
    for key, value in (("revision", args.revision), ("benchmark", args.benchmark or None)):
        if value is not None:
            request[key] = value
    if args.formats:
        request["formats"] = [f.strip() for f in args.formats.split(",") if f.strip()]
    return request


def _finished(job: dict[str, Any]) -> int:
    _print({k: job[k] for k in ("id", "status", "attempt", "error", "result", "model_revision")})
    return 0 if job["status"] == "succeeded" else 1


def _submit(args: argparse.Namespace) -> int:
    from server.follow import follow

    with _client(args) as client:
        job = client.submit(_request_from_args(args), idempotency_key=args.idempotency_key)
        if not args.wait:
            _print(job)
            return 0
        print(f"job {job['id']} {job['status']}", file=sys.stderr)
        return _finished(follow(client, job["id"]))


def _status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print(client.job(args.job))
    return 0


def _jobs(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for job in client.jobs(status=args.status, limit=args.limit)["jobs"]:
            progress = job["progress"] or {}
            where = f"{job['phase'] or ''} {progress.get('done', '')}/{progress.get('total', '')}".strip(" /")
            print(f"{job['id']}  {job['status']:<10} {where:<16} {job['request']['model']}")
    return 0


def _events(args: argparse.Namespace) -> int:
    with _client(args) as client:
        events = (
            client.stream_events(args.job, after=args.after)
            if args.follow
            else client.events(args.job, after=args.after)["events"]
        )
        for event in events:
            print(json.dumps(event))
    return 0


def _cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print(client.cancel(args.job))
    return 0


def _download(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    with _client(args) as client, tqdm(unit="B", unit_scale=True, desc="download", file=sys.stderr) as bar:
        files = client.download(
            args.job, args.dest, progress=bar.update, on_total=lambda n: bar.reset(total=n)
        )
    print(f"{len(files)} files in {args.dest}, sha256 verified", file=sys.stderr)
    return 0


def _upload(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print(client.upload_calibration(args.file))
    return 0


def _worker(args: argparse.Namespace) -> int:
    from server.settings import Settings
    from server.worker import run

    return run(args.job, args.attempt, Settings())


def _demo(args: argparse.Namespace) -> int:
    from server.demo import run_demo

    return run_demo(
        model=args.model,
        samples=args.samples,
        seqlen=args.seqlen,
        eval_tokens=args.eval_tokens,
        keep=args.keep,
    )
