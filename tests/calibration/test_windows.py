from __future__ import annotations

import inspect
import itertools
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import shears.calibration.windows as windows_module
from shears.calibration.builtin import builtin_documents
from shears.calibration.sources import open_source
from shears.calibration.spec import CalibrationSpec, EvaluationSpec
from shears.calibration.windows import (
    POOL_FACTOR,
    TokenStream,
    iter_batches,
    load_windows,
    sample_windows,
    save_windows,
)
from shears.errors import CalibrationError
from tests.tiny import make_tokenizer

SMALL_EVAL = EvaluationSpec(seqlen=128, max_tokens=1024)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def calib(source: str = "builtin", **kwargs: Any) -> CalibrationSpec:
    return CalibrationSpec(source=source, **{"samples": 16, "seqlen": 64, **kwargs})


def numbered_documents(count: int, items: int) -> list[str]:
    """Documents whose token windows occur once in the whole stream (every number appears once)."""
    return [f"Entry {i}: " + " ".join(f"item {i}-{j};" for j in range(items)) for i in range(count)]


def locate(stream: torch.Tensor, windows: torch.Tensor) -> list[int]:
    """Start position of each window in `stream`, asserting it occurs exactly once."""
    candidates = stream.unfold(0, windows.shape[1], 1)
    starts = []
    for window in windows:
        hits = (candidates == window).all(dim=1).nonzero().flatten().tolist()
        assert len(hits) == 1, f"window found at {hits}"
        starts.append(hits[0])
    return starts


def full_stream(spec: str, tokenizer: Any) -> TokenStream:
    stream = TokenStream(open_source(spec, text_column=None, uploads_dir=None), tokenizer)
    stream.read(10**9)
    return stream


def test_same_seed_same_windows_other_seed_others(tokenizer: Any) -> None:
    first = load_windows(calib(seed=3), SMALL_EVAL, tokenizer)
    again = load_windows(calib(seed=3), SMALL_EVAL, tokenizer)
    other = load_windows(calib(seed=4), SMALL_EVAL, tokenizer)
    assert first.calibration.dtype == torch.int64 and first.calibration.shape == (16, 64)
    assert torch.equal(first.calibration, again.calibration)
    assert torch.equal(first.evaluation, again.evaluation)
    assert first.info == again.info
    assert not torch.equal(first.calibration, other.calibration)
    assert torch.equal(first.evaluation, other.evaluation)  # evaluation text does not depend on the seed


def test_builtin_windows_come_from_their_splits(tokenizer: Any) -> None:
    result = load_windows(calib(), SMALL_EVAL, tokenizer)
    pool = TokenStream(builtin_documents("calibration"), tokenizer).read(POOL_FACTOR * 16 * 64)
    candidates = pool.unfold(0, 64, 1)
    for window in result.calibration:
        assert (candidates == window).all(dim=1).any()
    held_out = TokenStream(builtin_documents("evaluation"), tokenizer).read(1024)
    assert torch.equal(result.evaluation, held_out.reshape(8, 128))
    assert result.info["evaluation_holdout"] == "builtin held-out works"
    assert result.info["overlapping_windows"] is False
    assert result.info["calibration_pool_tokens"] == POOL_FACTOR * 16 * 64
    assert result.info["evaluation_tokens"] == 1024
    assert result.info["seed"] == 0


def test_sample_windows_are_disjoint_slices() -> None:
    pool = torch.arange(1000)
    windows, overlapping = sample_windows(pool, 15, 64, seed=1)
    assert not overlapping
    assert torch.equal(windows - windows[:, :1], torch.arange(64).expand(15, 64))  # contiguous slices
    assert windows.flatten().unique().numel() == 15 * 64
    again, _ = sample_windows(pool, 15, 64, seed=1)
    assert torch.equal(windows, again)


def test_small_pool_gives_overlapping_windows(tmp_path: Path, tokenizer: Any, caplog: Any) -> None:
    path = tmp_path / "short.txt"
    path.write_text(numbered_documents(1, 60)[0])
    tokens = full_stream(str(path), tokenizer).read(10**9).numel()
    assert 64 < tokens < 16 * 64
    with caplog.at_level(logging.WARNING, logger="shears.calibration.windows"):
        result = load_windows(calib(str(path)), None, tokenizer)
    assert result.info["overlapping_windows"] is True
    assert result.calibration.shape == (16, 64)
    assert "windows overlap" in caplog.text


def test_jsonl_holdout_is_whole_documents_after_calibration(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in numbered_documents(400, 12)))
    result = load_windows(calib(str(path)), SMALL_EVAL, tokenizer)
    stream = full_stream(str(path), tokenizer)
    tokens = stream.read(10**9)
    eval_start = locate(tokens, result.evaluation[:1])[0]
    assert eval_start in stream.document_starts  # the held-out part begins with a document
    assert eval_start >= 16 * 64
    assert torch.equal(tokens[eval_start : eval_start + 1024].reshape(8, 128), result.evaluation)
    starts = sorted(locate(tokens, result.calibration))
    assert all(b - a >= 64 for a, b in itertools.pairwise(starts))  # calibration windows disjoint
    assert starts[-1] + 64 <= eval_start  # and all before the held-out documents
    assert result.info["evaluation_holdout"] == "documents"
    assert result.info["evaluation_source"] == str(path)


def test_single_document_holdout_is_the_token_tail(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "one.txt"
    path.write_text(" ".join(numbered_documents(35, 12)))
    tokens = full_stream(str(path), tokenizer).read(10**9)
    assert tokens.numel() < POOL_FACTOR * 16 * 64 + 1024  # the whole file is read: its tail is held out
    result = load_windows(calib(str(path)), SMALL_EVAL, tokenizer)
    assert torch.equal(result.evaluation, tokens[-1024:].reshape(8, 128))
    starts = locate(tokens, result.calibration)
    assert max(starts) + 64 <= tokens.numel() - 1024
    assert result.info["evaluation_holdout"] == "tokens"
    assert result.info["overlapping_windows"] is False


def test_holdout_leaves_calibration_its_disjoint_windows(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "one.txt"
    path.write_text(" ".join(numbered_documents(14, 12)))
    tokens = full_stream(str(path), tokenizer).read(10**9).numel()
    assert 16 * 64 + 128 < tokens < 16 * 64 + 1024
    result = load_windows(calib(str(path)), SMALL_EVAL, tokenizer)
    assert result.info["overlapping_windows"] is False
    assert result.evaluation.numel() == (tokens - 16 * 64) // 128 * 128


def test_separate_evaluation_source(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "eval.txt"
    path.write_text(" ".join(numbered_documents(30, 12)))
    spec = EvaluationSpec(source=str(path), seqlen=128, max_tokens=512)
    result = load_windows(calib(), spec, tokenizer)
    tokens = full_stream(str(path), tokenizer).read(512)
    assert torch.equal(result.evaluation, tokens.reshape(4, 128))
    assert result.info["evaluation_source"] == str(path)
    builtin_eval = load_windows(
        calib(str(path), samples=2), EvaluationSpec(source="builtin", seqlen=128, max_tokens=256), tokenizer
    )
    held_out = TokenStream(builtin_documents("evaluation"), tokenizer).read(256)
    assert torch.equal(builtin_eval.evaluation, held_out.reshape(2, 128))


def test_evaluation_off(tokenizer: Any) -> None:
    assert load_windows(calib(), None, tokenizer).evaluation is None
    disabled = load_windows(calib(), EvaluationSpec(enabled=False), tokenizer)
    assert disabled.evaluation is None and disabled.info["evaluation_source"] is None


def test_safetensors_round_trip_and_upload(tmp_path: Path, tokenizer: Any) -> None:
    made = load_windows(calib(seed=9), None, tokenizer).calibration
    save_windows(tmp_path / "w.safetensors", made)
    reused = load_windows(calib(str(tmp_path / "w.safetensors"), samples=1, seqlen=8), SMALL_EVAL, tokenizer)
    assert torch.equal(reused.calibration, made)  # as-is: the file's shape wins over samples/seqlen
    assert reused.info["evaluation_holdout"] == "builtin held-out works"
    save_windows(tmp_path / "abc.safetensors", made[:4].to(torch.int32))
    uploaded = load_windows(calib("upload:abc"), None, tokenizer, uploads_dir=tmp_path)
    assert torch.equal(uploaded.calibration, made[:4]) and uploaded.calibration.dtype == torch.int64
    spec = EvaluationSpec(source=str(tmp_path / "w.safetensors"), seqlen=128, max_tokens=1024)
    evaluated = load_windows(calib(), spec, tokenizer)
    assert torch.equal(evaluated.evaluation, made)


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (torch.zeros(64, dtype=torch.int64), r"shape \[samples, seqlen\]; got torch.int64 \(64,\)"),
        (torch.zeros(2, 3, 4, dtype=torch.int64), r"got torch.int64 \(2, 3, 4\)"),
        (torch.zeros(2, 8), r"integer tensor.*got torch.float32"),
        (torch.full((2, 8), 512), r"span \[512, 512\] but the vocabulary has 512 ids"),
        (torch.full((2, 8), -1), r"span \[-1, -1\]"),
    ],
)
def test_bad_token_files(tmp_path: Path, tokenizer: Any, tensor: torch.Tensor, message: str) -> None:
    path = tmp_path / "bad.safetensors"
    save_file({"input_ids": tensor}, str(path))
    with pytest.raises(CalibrationError, match=message):
        load_windows(calib(str(path)), None, tokenizer)


def test_token_file_without_input_ids_or_corrupt(tmp_path: Path, tokenizer: Any) -> None:
    save_file({"ids": torch.zeros(2, 8, dtype=torch.int64)}, str(tmp_path / "k.safetensors"))
    with pytest.raises(CalibrationError, match=r"no tensor 'input_ids' \(found \['ids'\]\)"):
        load_windows(calib(str(tmp_path / "k.safetensors")), None, tokenizer)
    (tmp_path / "c.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(CalibrationError, match=r"not a readable \.safetensors file"):
        load_windows(calib(str(tmp_path / "c.safetensors")), None, tokenizer)


def test_self_uses_the_generator_and_builtin_evaluation(tokenizer: Any) -> None:
    calls = []

    def generate(samples: int, seqlen: int, seed: int) -> torch.Tensor:
        calls.append((samples, seqlen, seed))
        return torch.randint(0, 512, (samples, seqlen), generator=torch.Generator().manual_seed(seed))

    result = load_windows(calib("self", seed=5), SMALL_EVAL, tokenizer, generate=generate)
    assert calls == [(16, 64, 5)]
    assert result.calibration.shape == (16, 64)
    assert result.info["evaluation_source"] == "builtin"
    with pytest.raises(CalibrationError, match="needs a model to generate"):
        load_windows(calib("self"), None, tokenizer)
    with pytest.raises(CalibrationError, match=r"generation gave \(16, 32\)"):
        load_windows(
            calib("self"), None, tokenizer, generate=lambda n, s, seed: torch.zeros(n, s // 2).long()
        )
    with pytest.raises(CalibrationError, match=r"evaluation\.source 'self' is not supported"):
        load_windows(calib(), EvaluationSpec(source="self"), tokenizer)


def test_source_errors(tmp_path: Path, tokenizer: Any) -> None:
    with pytest.raises(CalibrationError, match="file not found"):
        load_windows(calib(str(tmp_path / "missing.txt")), None, tokenizer)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(CalibrationError, match=r"'.*empty.txt' has no text"):
        load_windows(calib(str(tmp_path / "empty.txt")), None, tokenizer)
    (tmp_path / "d.jsonl").write_text('{"body": "hello"}\n')
    with pytest.raises(CalibrationError, match=r"no column 'text'; columns found: \['body'\]"):
        load_windows(calib(str(tmp_path / "d.jsonl")), None, tokenizer)
    with pytest.raises(CalibrationError, match="local paths are not accepted"):
        load_windows(calib(str(tmp_path / "d.jsonl")), None, tokenizer, allow_local_paths=False)


def test_too_short_sources(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "tiny.txt"
    path.write_text("Entry 1: a short note.")
    tokens = full_stream(str(path), tokenizer).read(10**9).numel()
    expected = (
        rf"has {tokens} tokens, needs at least M = samples x seqlen = 16 x 64 = 1024.*lower samples or seqlen"
    )
    with pytest.raises(CalibrationError, match=expected):
        load_windows(calib(str(path)), None, tokenizer)
    with pytest.raises(
        CalibrationError,
        match=rf"has {tokens} tokens, needs at least M = samples x seqlen = 1024"
        r" plus one evaluation window of 128",
    ):
        load_windows(calib(str(path)), SMALL_EVAL, tokenizer)
    with pytest.raises(
        CalibrationError,
        match=rf"evaluation source '.*tiny.txt' has {tokens} tokens, fewer than "
        "one window of evaluation.seqlen = 128",
    ):
        load_windows(calib(), EvaluationSpec(source=str(path), seqlen=128, max_tokens=1024), tokenizer)
    with pytest.raises(
        CalibrationError, match=r"max_tokens=100 is less than one window of evaluation\.seqlen=128"
    ):
        load_windows(calib(), EvaluationSpec(seqlen=128, max_tokens=100), tokenizer)


def test_long_document_is_tokenised_in_pieces_lazily(
    tmp_path: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = "\n\n".join(d for _, d in zip(range(3), builtin_documents(), strict=False))
    monkeypatch.setattr(windows_module, "PIECE_CHARS", 2000)
    monkeypatch.setattr(tokenizer, "model_max_length", 128)
    whole = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    key = "sequence-length-is-longer-than-the-specified-maximum"
    monkeypatch.setitem(tokenizer.deprecation_warnings, key, False)
    stream = TokenStream(iter([text]), tokenizer)
    assert stream.read(10**9).tolist() == whole  # pieces cut at whitespace tokenise like the whole
    assert not tokenizer.deprecation_warnings[key]  # the too-long warning was never raised

    path = tmp_path / "long.txt"
    path.write_text(text * 20)
    result = load_windows(calib(str(path), samples=4), None, tokenizer)
    assert result.info["calibration_tokens_seen"] < len(whole)  # read only as far as needed


def test_documents_are_joined_with_eos(tokenizer: Any) -> None:
    stream = TokenStream(iter(["alpha beta", "gamma"]), tokenizer)
    tokens = stream.read(100).tolist()
    alpha = tokenizer("alpha beta", add_special_tokens=False)["input_ids"]
    gamma = tokenizer("gamma", add_special_tokens=False)["input_ids"]
    assert tokens == [*alpha, tokenizer.eos_token_id, *gamma]
    assert stream.document_starts == [0, len(alpha) + 1]


def test_iter_batches_shapes_and_laziness() -> None:
    windows = torch.arange(10 * 8).reshape(10, 8)
    batches = iter_batches(windows, 4)
    assert inspect.isgenerator(batches)
    shapes = [tuple(b.shape) for b in batches]
    assert shapes == [(4, 8), (4, 8), (2, 8)]
    assert torch.equal(torch.cat(list(iter_batches(windows, 3))), windows)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        next(iter_batches(windows, 0))
