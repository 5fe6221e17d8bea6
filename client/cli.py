"""`shears submit | status | jobs | events | cancel | download | upload | demo`: talk to a server."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from shears.pattern import Pattern
from shears.structure import parse_structure


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
    submit = sub.add_parser("submit", help="submit a pruning job to a server")
    _client_args(submit)
    submit.add_argument("model", nargs="?", help="built-in alias, hub repo id, or a path the server allows")
    # Not checked here: the server knows its methods (a 422 lists them) and their options.
    submit.add_argument("--method", help="a pruning method of the server, e.g. sparsegpt, wanda, magnitude")
    submit.add_argument(
        "--structure", help="remove whole units first, e.g. 'layers=0.2' or 'mlp=0.25,heads=0.25'"
    )
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
    submit.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="any request field by its dotted path, value as JSON or text "
        "(e.g. sparsegpt.refine_iterations=0, true_sequential=true); repeatable",
    )
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

    demo = sub.add_parser("demo", help="start a server, prune the built-in model through it, report")
    demo.add_argument("--model", default="smollm2-135m")
    demo.add_argument("--samples", type=int, default=32)
    demo.add_argument("--seqlen", type=int, default=256)
    demo.add_argument("--eval-tokens", type=int, default=4096)
    demo.add_argument("--keep", type=Path, help="keep the server's data dir here instead of a temporary one")
    demo.set_defaults(func=_demo)


def _client(args: argparse.Namespace) -> Any:
    from shears.client.client import ShearsClient

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
    if sparsity is None and args.method != "none":
        try:
            sparsity = Pattern.parse(args.pattern).sparsity
        except ValueError as exc:
            raise SystemExit(f"shears submit: {exc}") from None
    if sparsity is None and args.method != "none":
        raise SystemExit("shears submit: give --sparsity (or an N:M --pattern)")
    if sparsity is not None:
        request["sparsity"] = sparsity
    if args.structure:
        try:
            request["structure"] = parse_structure(args.structure)
        except ValueError as exc:
            raise SystemExit(f"shears submit: --structure: {exc}") from None
    calibration = {"source": args.calib, "samples": args.samples, "seqlen": args.seqlen, "seed": args.seed}
    request["calibration"] = {k: v for k, v in calibration.items() if v is not None}
    evaluation = {"enabled": not args.no_eval, "max_tokens": args.eval_tokens}
    request["evaluation"] = {k: v for k, v in evaluation.items() if v is not None}
    for key, value in (("revision", args.revision), ("benchmark", args.benchmark or None)):
        if value is not None:
            request[key] = value
    if args.formats:
        request["formats"] = [f.strip() for f in args.formats.split(",") if f.strip()]
    for item in args.set:
        _set_field(request, item)
    return request


def _set_field(request: dict[str, Any], item: str) -> None:
    """Apply one --set FIELD=VALUE: a dotted path into the request, a JSON value (else the text)."""
    path, sep, text = item.partition("=")
    if not sep or not path:
        raise SystemExit(f"shears submit: --set {item!r}: expected FIELD=VALUE")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    *parents, leaf = path.split(".")
    node = request
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise SystemExit(f"shears submit: --set {item!r}: {key} is not an object")
    node[leaf] = value


def _finished(job: dict[str, Any]) -> int:
    _print({k: job[k] for k in ("id", "status", "attempt", "error", "result", "model_revision")})
    return 0 if job["status"] == "succeeded" else 1


def _submit(args: argparse.Namespace) -> int:
    from shears.client.follow import follow

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


def _demo(args: argparse.Namespace) -> int:
    from shears.client.demo import run_demo

    return run_demo(
        model=args.model,
        samples=args.samples,
        seqlen=args.seqlen,
        eval_tokens=args.eval_tokens,
        keep=args.keep,
    )
