"""Operator settings for `shears serve` and its workers: SHEARS_* environment variables or CLI flags.

Flags win over the environment. The server hands its settings to each worker it spawns as SHEARS_*
variables (`worker_env`), so a worker sees exactly what the server saw.
"""

from __future__ import annotations

import ipaddress
import json
import os
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shears.pruning.config import EngineOptions, OperatorOptions

# Passed on to workers; the token and the listen address stay with the API process.
_WORKER_FIELDS = (
    "data_dir",
    "store_url",
    "lease_seconds",
    "heartbeat_seconds",
    "min_free_disk_bytes",
    "model_dirs",
    "text_dirs",
    "cache_dir",
    "allow_pickle",
    "trust_remote_code",
    "max_shard_bytes",
    "worker_nice",
    "checkpoint_interval_seconds",
    "artifacts_url",
    "artifacts_options",
    "vllm_python",
)


def visible_gpu_count() -> int:
    """NVIDIA GPUs this process may use, without importing torch (the API process never does)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    gpus = Path("/proc/driver/nvidia/gpus")
    return len(list(gpus.iterdir())) if gpus.is_dir() else 0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings, OperatorOptions):
    """The server's settings; allow_pickle, trust_remote_code and max_shard_bytes come from
    OperatorOptions, as the engine declares them."""

    model_config = SettingsConfigDict(env_prefix="SHEARS_", extra="forbid")

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    data_dir: Path = Field(Path(".shears"), description="job store, artifacts, uploads and model cache")
    store_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///<data_dir>/shears.db")
    executor: Literal["local", "ray"] = Field(
        "local", description="local: a process per job on this machine; ray: a Ray job per job on a cluster"
    )
    ray_address: str = Field(
        "http://127.0.0.1:8265", description="the Ray cluster's job submission (dashboard) address"
    )
    ray_python: str = Field(
        "python",
        description="the Python on the Ray nodes that has shears installed (runs `-m server worker`)",
    )
    ray_gpus_per_job: Annotated[float, Field(ge=0)] = Field(1.0, description="GPUs each Ray job asks for")
    ray_cpus_per_job: Annotated[float, Field(ge=0)] = Field(1.0, description="CPUs each Ray job asks for")
    artifacts_url: str | None = Field(
        None,
        description="fsspec URL for artifacts and calibration uploads (s3://bucket/prefix, a shared folder); "
        "default: <data_dir>/jobs on this machine",
    )
    artifacts_options: dict[str, Any] = Field(
        default_factory=dict, description='fsspec storage options as JSON, e.g. {"endpoint_url": ...}'
    )
    max_concurrent_jobs: Annotated[int | None, Field(ge=0)] = Field(
        None, description="jobs running at once; default: the number of GPUs, or 1 without one; 0 = drain"
    )
    queue_cap: Annotated[int, Field(ge=1)] = 100
    token: SecretStr | None = Field(None, description="bearer token; required on a non-loopback bind")
    upload_max_bytes: Annotated[int, Field(ge=1)] = 64 << 20
    upload_quota_bytes: Annotated[int, Field(ge=0)] = Field(
        4 << 30, description="bytes all calibration uploads together may hold (DELETE frees them)"
    )
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 3
    lease_seconds: Annotated[float, Field(gt=0)] = 30.0
    heartbeat_seconds: Annotated[float, Field(gt=0)] = 5.0
    cancel_grace_seconds: Annotated[float, Field(ge=0)] = 10.0
    dispatch_interval_seconds: Annotated[float, Field(gt=0)] = 0.5
    min_free_disk_bytes: Annotated[int, Field(ge=0)] = 2 << 30
    model_dirs: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="folders whose local models (HF folders, .gguf) jobs may name"
    )
    text_dirs: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="folders whose local text files jobs may use for calibration"
    )
    cache_dir: Path | None = Field(
        None,
        description="model cache; default: the engine's ($SHEARS_HOME/models "
        "or ~/.cache/shears/models), shared with `shears models prepare`",
    )
    worker_nice: Annotated[int, Field(ge=0, le=19)] = Field(
        0,
        description="niceness added to workers (the API answers within milliseconds without it; raise it "
        "to favour other processes of the machine over jobs)",
    )
    vllm_python: Path | None = Field(
        None,
        description="a Python with vLLM installed (e.g. bench/.venv-vllm/bin/python from `make vllm-venv`); "
        "jobs may ask for verify_runtimes ['vllm'] only when it is set",
    )
    checkpoint_interval_seconds: Annotated[float, Field(ge=0)] = Field(
        0.0,
        description="a running job checkpoints after every block (0) or, to write less, after the first "
        "block ending this many seconds after its last checkpoint; a re-queued job resumes from there",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    @field_validator("token", mode="before")
    @classmethod
    def _empty_token(cls, value: Any) -> Any:
        return None if value is None or (isinstance(value, str) and not value.strip()) else value

    @field_validator("model_dirs", "text_dirs", mode="before")
    @classmethod
    def _path_list(cls, value: Any) -> Any:
        # From the environment: a JSON list or an os.pathsep-separated list, like PATH.
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part for part in text.split(os.pathsep) if part]
        return value

    @cached_property
    def resolved_store_url(self) -> str:
        return self.store_url or f"sqlite:///{self.data_dir.resolve() / 'shears.db'}"

    @property
    def concurrency(self) -> int:
        if self.max_concurrent_jobs is not None:
            return self.max_concurrent_jobs
        if self.executor == "ray":
            # Ray places jobs and holds the extra ones until a GPU frees; this caps jobs handed to it.
            return 8
        return max(1, visible_gpu_count())

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir.resolve() / "jobs"

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir.resolve() / "uploads"

    def artifact_storage(self) -> Any:
        """The remote artifact storage (server.storage.RemoteArtifacts), or None for <data_dir>/jobs."""
        if not self.artifacts_url:
            return None
        from shears.server.storage import RemoteArtifacts

        return RemoteArtifacts(self.artifacts_url, self.artifacts_options)

    def engine_options(self) -> EngineOptions:
        return EngineOptions(
            **self.model_dump(include=set(OperatorOptions.model_fields)),
            cache_dir=str(self.cache_dir.resolve()) if self.cache_dir else None,
            uploads_dir=str(self.uploads_dir),
            # Requests come from HTTP users: the engine reads local text files only where the operator
            # allowed some (admission then checks each path is inside those folders).
            allow_local_paths=bool(self.text_dirs),
            runtime_pythons={"vllm": str(self.vllm_python)} if self.vllm_python else {},
        )

    def startup_problem(self) -> str | None:
        """Why the server must not start with these settings, or None."""
        if not is_loopback(self.host) and not (self.token and self.token.get_secret_value()):
            return (
                f"refusing to bind {self.host}: a bearer token is required on any non-loopback address "
                "(set SHEARS_TOKEN or --token)"
            )
        return None

    def worker_env(self) -> dict[str, str]:
        """SHEARS_* variables that reproduce these settings in a worker process."""
        env: dict[str, str] = {"SHEARS_STORE_URL": self.resolved_store_url}
        for name in _WORKER_FIELDS:
            value = getattr(self, name)
            if name == "store_url" or value is None:
                continue
            if name == "data_dir":
                value = value.resolve()
            if isinstance(value, list):
                text = json.dumps([str(item) for item in value])
            elif isinstance(value, dict):
                text = json.dumps(value)
            elif isinstance(value, bool):
                text = "true" if value else "false"
            else:
                text = str(value)
            env[f"SHEARS_{name.upper()}"] = text
        return env
