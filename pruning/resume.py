"""Resume a job from its last finished block: a checkpoint after every block, checked before use.

A job's checkpoint folder outlives its attempts (the caller keeps it, one per job):

    partial/                       the output being written: the shards so far; renamed to the
                                   output folder when the job succeeds
    checkpoint.json                the commit point, replaced atomically after each block: who the
                                   job is (identity), the next block, the shard writer's state (sizes
                                   and sha256 of what is on disk), the per-layer results and targets
                                   so far (the OWL plan), and the activations file with its sha256
    activations-<block>.safetensors  the calibration and evaluation hidden states entering that
                                   block, and the RNG state
    attempts.json                  each attempt's starting block (for the manifest)
    lock                           flock'ed by the one process using the folder

An attempt that finds a checkpoint verifies all of it (request hash, model revision and files,
block index, checksums, shapes) and continues at its block; anything that does not match means a
clean restart with the folder emptied: an output is never a mix of two runs. The block loop does the
same work with or without a checkpoint, so a resumed output is byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from shears.progress import Event, Reporter
from shears.pruning.block_pruner import LayerResult
from shears.pruning.config import PruneRequest
from shears.pruning.models import ResolvedModel
from shears.pruning.shards import Shard, ShardWriter, TensorSpec, plan_shards
from shears.pruning.skeleton import Skeleton
from shears.pruning.streaming import Batch

FORMAT = "shears-checkpoint/1"
CHECKPOINT = "checkpoint.json"
ATTEMPTS = "attempts.json"
_STREAMS = ("calib", "dense_calib", "dense_eval", "pruned_eval")  # dense_calib: the dense model's stream
_ACTIVATIONS = re.compile(r"activations-[0-9]{5}\.safetensors")


class Mismatch(ValueError):
    """The checkpoint does not belong to this job, or its files are not what it recorded."""


@dataclass
class Progress:
    """Where the block loop starts and what it has done before."""

    start: int
    targets: dict[str, float | None]
    layers: list[LayerResult]
    blocks: list[dict[str, Any]]


def identity(
    request: PruneRequest, model: ResolvedModel, skeleton: Skeleton, shards: list[Shard]
) -> dict[str, Any]:
    """What must be the same for a checkpoint to continue this job."""
    plan = [[s.file, [[t.name, str(t.dtype), list(t.shape)] for t in s.tensors]] for s in shards]
    files = sorted(
        [p.name, p.stat().st_size, p.stat().st_mtime_ns]
        for p in model.path.iterdir()
        if p.is_file() and p.suffix in (".safetensors", ".json")
    )
    return {
        "request_sha256": _sha256_json(request.model_dump(mode="json")),
        "model_revision": model.revision,
        "model_files_sha256": _sha256_json(files),
        "num_blocks": skeleton.num_blocks,
        "compute_dtype": str(skeleton.dtype),
        "device": skeleton.device.type,
        "shard_plan_sha256": _sha256_json(plan),
    }


class Checkpoints:
    """The checkpoint folder of one job, held by this process (see `acquire`)."""

    def __init__(
        self, folder: Path, lock: int, *, attempt: int, min_free_bytes: int, interval_seconds: float
    ) -> None:
        self.folder, self._lock = folder, lock
        self.attempt, self.min_free_bytes = attempt, min_free_bytes
        self.interval_seconds = interval_seconds
        self._saved_at = -math.inf
        self.identity: dict[str, Any] = {}
        self.attempts: list[dict[str, Any]] = []

    @classmethod
    def acquire(
        cls, folder: Path, *, attempt: int = 1, min_free_bytes: int = 0, interval_seconds: float = 0.0
    ) -> Checkpoints | None:
        """The folder's checkpoints for this process, or None while another process holds them (a
        worker whose lease ran out may still be running: then this attempt starts over elsewhere).

        `interval_seconds`: 0 checkpoints after every block; more skips blocks that end sooner than
        that after the last checkpoint (each costs a write of all activations: small models with
        short blocks may prefer fewer)."""
        folder.mkdir(parents=True, exist_ok=True)
        lock = os.open(folder / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            return None
        return cls(
            folder, lock, attempt=attempt, min_free_bytes=min_free_bytes, interval_seconds=interval_seconds
        )

    def release(self) -> None:
        if self._lock >= 0:
            os.close(self._lock)  # closing the descriptor drops the flock
            self._lock = -1

    @property
    def work(self) -> Path:
        """The partial output folder (created if missing)."""
        path = self.folder / "partial"
        path.mkdir(exist_ok=True)
        return path

    # -- the start of an attempt ------------------------------------------------------------------

    def resume(
        self,
        ident: dict[str, Any],
        writer: ShardWriter,
        streams: dict[str, list[Batch]],
        targets: dict[str, float | None],
        reporter: Reporter,
    ) -> Progress | None:
        """Continue from the checkpoint if it verifies: the writer and the streams' hidden states and
        the RNG are restored, and the Progress says where to go on. Else None, with a clean folder."""
        self.identity = ident
        progress = None
        path = self.folder / CHECKPOINT
        if path.exists():
            try:
                progress = self._load(json.loads(path.read_text()), writer, streams, targets)
            except (ValueError, KeyError, TypeError, OSError) as exc:  # Mismatch is a ValueError
                reporter(Event("log", message=f"checkpoint not used ({exc}); starting over from block 0"))
        if progress is None:
            self.reset()
        self._record_attempt(progress.start if progress is not None else 0)
        if progress is not None:
            reporter(
                Event(
                    "resumed",
                    message=f"resumed at block {progress.start + 1} of {ident['num_blocks']}",
                    data={"from_block": progress.start, "attempt": self.attempt},
                )
            )
        return progress

    def _load(
        self,
        saved: dict[str, Any],
        writer: ShardWriter,
        streams: dict[str, list[Batch]],
        targets: dict[str, float | None],
    ) -> Progress:
        if saved.get("format") != FORMAT:
            raise Mismatch(f"format {saved.get('format')!r}, not {FORMAT}")
        for key, value in self.identity.items():
            if saved["identity"].get(key) != value:
                raise Mismatch(f"{key} differs from the checkpoint's")
        block = saved["block"]
        if not isinstance(block, int) or not 0 < block <= self.identity["num_blocks"]:
            raise Mismatch(f"block index {block!r} is out of range")
        if set(saved["targets"]) != set(targets):
            raise Mismatch("the pruned layers differ")
        layers = [LayerResult(**{**entry, "shape": tuple(entry["shape"])}) for entry in saved["layers"]]
        progress = Progress(block, dict(saved["targets"]), layers, list(saved["blocks"]))
        if not _ACTIVATIONS.fullmatch(saved["activations"]["file"]):
            raise Mismatch("the activations file name is not one this module writes")
        activations = self.folder / saved["activations"]["file"]
        if _file_sha256(activations) != saved["activations"]["sha256"]:
            raise Mismatch(f"{activations.name} does not match its sha256")
        with safe_open(activations, framework="pt") as stored:
            hidden = {name: stored.get_tensor(name) for name in stored.keys()}  # noqa: SIM118
        if "rng.cpu" not in hidden:
            raise Mismatch("the checkpoint has no RNG state")
        for stream in _STREAMS:
            for position, batch in enumerate(streams[stream]):
                tensor = hidden.get(f"{stream}.{position}")
                if tensor is None or tensor.shape != batch.hidden.shape or tensor.dtype != batch.hidden.dtype:
                    raise Mismatch(f"the stored {stream} activations do not fit this job's batches")
            if f"{stream}.{len(streams[stream])}" in hidden:
                raise Mismatch(f"the checkpoint holds more {stream} batches than this job")
        # Checks the shards' bytes and changes nothing unless they match: the last step that can fail.
        writer.restore(saved["writer"])
        kept = set(saved["writer"]["files"])
        for path in writer.folder.iterdir():  # what a lost attempt wrote after its last block
            if path.name in kept:
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        with torch.inference_mode():  # the captured hidden states are inference tensors
            for stream in _STREAMS:
                for position, batch in enumerate(streams[stream]):
                    batch.hidden.copy_(hidden[f"{stream}.{position}"])
        torch.set_rng_state(hidden["rng.cpu"])
        if torch.cuda.is_available() and "rng.cuda.0" in hidden:
            torch.cuda.set_rng_state_all(
                [
                    hidden[f"rng.cuda.{i}"]
                    for i in range(torch.cuda.device_count())
                    if f"rng.cuda.{i}" in hidden
                ]
            )
        return progress

    def _record_attempt(self, start: int) -> None:
        path = self.folder / ATTEMPTS
        try:
            recorded = json.loads(path.read_text()) if path.exists() else []
        except ValueError:
            recorded = []
        self.attempts = [a for a in recorded if a.get("attempt") != self.attempt]
        self.attempts.append({"attempt": self.attempt, "from_block": start})
        _write_atomic(path, json.dumps(self.attempts).encode())

    # -- after each block ---------------------------------------------------------------------------

    def save(
        self,
        block: int,
        writer: ShardWriter,
        streams: dict[str, list[Batch]],
        progress: Progress,
        reporter: Reporter,
    ) -> bool:
        """Checkpoint the boundary before `block` (all blocks before it are done and written).
        Skipped, with a log event, when the disk would drop below the free-space minimum; skipped
        quietly within `interval_seconds` of the last one."""
        if time.monotonic() - self._saved_at < self.interval_seconds:
            return False
        tensors = {f"{s}.{i}": b.hidden for s in _STREAMS for i, b in enumerate(streams[s])}
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for index, state in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{index}"] = state
        needed = sum(t.numel() * t.element_size() for t in tensors.values()) + (1 << 20)
        free = shutil.disk_usage(self.folder).free
        if free - needed < self.min_free_bytes:
            reporter(
                Event(
                    "log",
                    message=f"no checkpoint after block {block}: it needs {needed} bytes and the disk has "
                    f"{free} free (the minimum kept free is {self.min_free_bytes})",
                )
            )
            return False
        shard_state = writer.snapshot()  # the shards' bytes are on disk (fsynced) from here
        name = f"activations-{block:05d}.safetensors"
        specs = [TensorSpec(key, t.dtype, tuple(t.shape)) for key, t in tensors.items()]
        [plan] = plan_shards(specs, max_bytes=1 << 62, stem=name.removesuffix(".safetensors"))
        stored = ShardWriter(self.folder, [plan], hashing=True, exact=True)
        try:
            for key, tensor in tensors.items():
                stored.write(key, tensor)
        except OSError as exc:  # the disk filled up after all: the job goes on, the last checkpoint holds
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            stored.abort()
            (self.folder / name).unlink(missing_ok=True)
            reporter(Event("log", message=f"no checkpoint after block {block}: the disk is full ({exc})"))
            return False
        finally:
            stored.abort()
        digest = stored.snapshot()["files"][name]
        checkpoint = {
            "format": FORMAT,
            "identity": self.identity,
            "block": block,
            "writer": shard_state,
            "targets": progress.targets,
            "layers": [asdict(r) for r in progress.layers],
            "blocks": progress.blocks,
            "activations": {"file": name, "sha256": digest["sha256"], "size": digest["size"]},
        }
        _write_atomic(self.folder / CHECKPOINT, json.dumps(checkpoint).encode())
        for old in self.folder.glob("activations-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)
        self._saved_at = time.monotonic()
        return True

    # -- the end -----------------------------------------------------------------------------------

    def reset(self) -> None:
        """No checkpoint, an empty partial output (the attempts record stays)."""
        for path in self.folder.iterdir():
            if path.name in ("lock", ATTEMPTS):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        (self.folder / "partial").mkdir()

    def remove(self) -> None:
        """The job is over: the whole folder goes."""
        self.release()
        shutil.rmtree(self.folder, ignore_errors=True)


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write a sibling, fsync it, rename it over `path`, fsync the folder: old or new, never half."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
