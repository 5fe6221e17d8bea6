"""Resuming a job from its last finished block (pruning.resume), through the real engine: an attempt
interrupted after block k leaves a checkpoint; the next continues at k and writes the same bytes as an
uninterrupted run; a checkpoint that does not verify means a clean restart, never a mixed output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from shears.progress import Event
from shears.pruning.config import PruneRequest
from shears.pruning.engine import prune
from shears.pruning.resume import CHECKPOINT, Checkpoints
from shears.pruning.shards import ShardWriter, TensorSpec, plan_shards
from tests.pruning.test_engine import fast_request
from tests.tiny import make_tiny_model

BLOCKS = 4
STOP_AFTER = 2  # the interrupted attempt stops once block 2 is reported (after its checkpoint)


class Stop(KeyboardInterrupt):
    """What a worker's SIGTERM raises (a KeyboardInterrupt, so nothing catches it on the way out)."""


@pytest.fixture(scope="module")
def four_blocks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("four") / "llama", num_hidden_layers=BLOCKS)


def _request(model: Path, dtype: str = "float32", seed: int = 0) -> PruneRequest:
    request = fast_request(model, compute_dtype=dtype)
    return request.model_copy(update={"calibration": request.calibration.model_copy(update={"seed": seed})})


def _interrupted(request: PruneRequest, folder: Path, out: Path, interval: float = 0.0) -> None:
    """Attempt 1: stopped right after block STOP_AFTER is reported; its folder is left as it was."""

    def reporter(event: Event) -> None:
        if event.kind == "progress" and event.done == STOP_AFTER:
            raise Stop

    checkpoints = Checkpoints.acquire(folder, attempt=1, interval_seconds=interval)
    assert checkpoints is not None
    with pytest.raises(Stop):
        prune(request, out, reporter=reporter, checkpoints=checkpoints)
    checkpoints.release()  # the process is gone


def _resumed(request: PruneRequest, folder: Path, out: Path) -> tuple[dict[str, Any], list[Event]]:
    events: list[Event] = []
    checkpoints = Checkpoints.acquire(folder, attempt=2)
    assert checkpoints is not None
    manifest = prune(request, out, reporter=events.append, checkpoints=checkpoints)
    checkpoints.release()
    return manifest, events


def _same_output(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name != "manifest.json":
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ma, mb = (json.loads((folder / "manifest.json").read_text()) for folder in (a, b))
    assert ma["files"] == mb["files"] and ma["sparsity"] == mb["sparsity"]
    assert ma["perplexity"] == mb["perplexity"]
    assert _timeless(ma["layers"].values()) == _timeless(mb["layers"].values())
    assert _timeless(ma["blocks"]) == _timeless(mb["blocks"])


def _timeless(entries: Any) -> list[dict[str, Any]]:
    """Per-layer or per-block results without the seconds each took."""
    return [{k: v for k, v in entry.items() if k != "seconds"} for entry in entries]


@pytest.fixture(scope="module")
def runs(four_blocks: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Per compute dtype: an uninterrupted output, and the checkpoint folder of an interrupted attempt
    (tests take copies)."""
    made = {}
    for dtype in ("float32", "bfloat16"):
        root = tmp_path_factory.mktemp(dtype)
        request = _request(four_blocks, dtype)
        prune(request, root / "reference")
        _interrupted(request, root / "checkpoints", root / "first")
        assert not (root / "first").exists()
        made[dtype] = (root / "reference", root / "checkpoints")
    return made


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_resumed_output_is_byte_identical(
    four_blocks: Path, runs: dict[str, tuple[Path, Path]], tmp_path: Path, dtype: str
) -> None:
    reference, interrupted = runs[dtype]
    folder = tmp_path / "checkpoints"
    shutil.copytree(interrupted, folder)
    assert json.loads((folder / CHECKPOINT).read_text())["block"] == STOP_AFTER
    # What a killed attempt may leave after its last checkpoint: bytes of the next block, a stray file.
    shard = next((folder / "partial").glob("model*.safetensors"))
    with open(shard, "ab") as handle:
        handle.write(b"half a block")
    (folder / "partial" / "config.json").write_text("{}")

    manifest, events = _resumed(_request(four_blocks, dtype), folder, tmp_path / "second")
    resumed = [e for e in events if e.kind == "resumed"]
    assert [e.data["from_block"] for e in resumed] == [STOP_AFTER]
    progress = [e.done for e in events if e.kind == "progress" and e.phase == "pruning"]
    assert progress == list(range(STOP_AFTER + 1, BLOCKS + 1))
    assert manifest["attempts"] == [{"attempt": 1, "from_block": 0}, {"attempt": 2, "from_block": STOP_AFTER}]
    _same_output(reference, tmp_path / "second")
    # The job is done: no checkpoint is left to resume.
    assert not (folder / CHECKPOINT).exists() and not list(folder.glob("activations-*"))


@pytest.mark.parametrize("damage", ["activations", "shard", "request"])
def test_a_checkpoint_that_does_not_verify_means_a_clean_restart(
    four_blocks: Path, runs: dict[str, tuple[Path, Path]], tmp_path: Path, damage: str
) -> None:
    reference, interrupted = runs["float32"]
    request = _request(four_blocks)
    folder = tmp_path / "checkpoints"
    shutil.copytree(interrupted, folder)
    saved = json.loads((folder / CHECKPOINT).read_text())
    if damage == "request":
        request = _request(four_blocks, seed=7)  # another job's checkpoint
        reference = tmp_path / "reference"
        prune(request, reference)
    else:  # one bit flipped in the stored hidden states, or in the shard bytes written so far
        if damage == "activations":
            path = folder / saved["activations"]["file"]
        else:
            path = folder / "partial" / next(iter(saved["writer"]["files"]))
        data = bytearray(path.read_bytes())
        data[len(data) - 3 if damage == "activations" else len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))

    manifest, events = _resumed(request, folder, tmp_path / "second")
    assert not [e for e in events if e.kind == "resumed"]
    notes = [e.message for e in events if e.kind == "log" and "checkpoint not used" in e.message]
    assert len(notes) == 1, [e.message for e in events if e.kind == "log"]
    assert next(e.done for e in events if e.kind == "progress" and e.phase == "pruning") == 1
    assert manifest["attempts"][-1] == {"attempt": 2, "from_block": 0}
    _same_output(reference, tmp_path / "second")


def test_no_checkpoint_without_the_disk_space(four_blocks: Path, tmp_path: Path) -> None:
    events: list[Event] = []
    checkpoints = Checkpoints.acquire(tmp_path / "checkpoints", min_free_bytes=1 << 60)
    assert checkpoints is not None
    prune(_request(four_blocks), tmp_path / "out", reporter=events.append, checkpoints=checkpoints)
    skipped = [e.message for e in events if e.kind == "log" and e.message.startswith("no checkpoint")]
    assert len(skipped) == BLOCKS and "free" in skipped[0]
    assert (tmp_path / "out" / "manifest.json").exists()


def test_checkpoints_can_be_spaced_out(four_blocks: Path, tmp_path: Path) -> None:
    """With an interval, blocks that end sooner after the last checkpoint are not saved."""
    _interrupted(_request(four_blocks), tmp_path / "checkpoints", tmp_path / "out", interval=3600)
    assert json.loads((tmp_path / "checkpoints" / CHECKPOINT).read_text())["block"] == 1


def test_one_process_at_a_time(tmp_path: Path) -> None:
    first = Checkpoints.acquire(tmp_path / "checkpoints")
    assert first is not None
    assert Checkpoints.acquire(tmp_path / "checkpoints") is None  # a lost worker still holds it
    first.release()
    again = Checkpoints.acquire(tmp_path / "checkpoints")
    assert again is not None
    again.remove()
    assert not (tmp_path / "checkpoints").exists()


def test_activations_are_stored_bit_for_bit(tmp_path: Path) -> None:
    """Weights are written with -0.0 as +0.0; saved hidden states must come back exactly."""
    hidden = torch.tensor([[-0.0, 1.5, -2.25e-40]], dtype=torch.float32)
    [plan] = plan_shards([TensorSpec("calib.0", hidden.dtype, tuple(hidden.shape))], 1 << 30, stem="a")
    writer = ShardWriter(tmp_path, [plan], hashing=True, exact=True)
    writer.write("calib.0", hidden)
    back = load_file(tmp_path / "a.safetensors")["calib.0"]
    assert torch.equal(back.view(torch.int32), hidden.view(torch.int32))
    assert writer.snapshot()["files"]["a.safetensors"]["size"] == (tmp_path / "a.safetensors").stat().st_size
