"""`shears pack / unpack / bench` and run_benchmark on a machine without a GPU."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch

from shears.kernels import cli
from shears.kernels.bench import run_benchmark
from shears.kernels.sparse_file import PACKED_DIR, SPARSE_FILE, pack_folder, read_packed


def shears(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="shears")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture
def bf16_folder(pruned_24_bf16: tuple[Path, list[str]], tmp_path: Path) -> tuple[Path, list[str]]:
    source, names = pruned_24_bf16
    shutil.copytree(source, tmp_path / "model")
    return tmp_path / "model", names


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU report")
def test_run_benchmark_without_gpu_reports_sizes(bf16_folder: tuple[Path, list[str]]) -> None:
    folder, names = bf16_folder
    pack_folder(folder, (2, 4), names)
    events = []
    result = run_benchmark(folder, events.append)
    assert result["device"]["gpu"] is False and "no CUDA GPU" in result["message"]
    assert "kernels" not in result and "decode" not in result
    sizes = result["sizes"]
    assert sizes["source"] == "file" and len(sizes["layers"]) == len(names)
    assert sizes["total"]["ratio"] == pytest.approx(0.5625)
    assert sizes["total"]["dense_bytes"] == sum(r["dense_bytes"] for r in sizes["layers"])
    assert all(r["pattern"] == "2:4" and r["memory_bytes"] == r["packed_bytes"] for r in sizes["layers"])
    assert sizes["files"]["sparse_files_bytes"] == (folder / PACKED_DIR / SPARSE_FILE).stat().st_size
    checks = result["checks"]
    assert checks["mode"] == "interpreter" and checks["results"] and all(r["ok"] for r in checks["results"])
    written = json.loads((folder / "bench.json").read_text())
    assert written["sizes"] == sizes and written["schema"] == "shears.bench/1"
    assert (folder / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert events[0].kind == "log" and events[-1].kind == "result"
    assert all(e.phase == "benchmarking" for e in events)


def test_bench_packs_in_memory_from_manifest(
    pruned_unstructured: tuple[Path, list[str]], tmp_path: Path
) -> None:
    source, names = pruned_unstructured
    folder = tmp_path / "model"
    shutil.copytree(source, folder)
    layers = {name.removesuffix(".weight"): {"sparsity": 0.7} for name in names}
    (folder / "manifest.json").write_text(
        json.dumps({"request": {"pattern": "unstructured"}, "layers": layers})
    )
    result = run_benchmark(folder)
    sizes = result["sizes"]
    assert sizes["source"] == "memory" and sizes["files"]["sparse_files_bytes"] == 0
    assert len(sizes["layers"]) == 14 and all(r["layout"] == "bitmask" for r in sizes["layers"])
    # 70% sparse fp32: 30% of the values + 1 bit per weight + row offsets
    assert 0.3 < sizes["total"]["ratio"] < 0.36
    assert all(r["memory_bytes"] > r["packed_bytes"] for r in sizes["layers"])  # + the kernels' chunk offsets
    assert not (folder / PACKED_DIR).exists()


def test_cli_pack_detects_pattern_then_unpacks(
    pruned_24: tuple[Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, names = pruned_24
    folder = tmp_path / "model"
    shutil.copytree(source, folder)
    assert shears("pack", str(folder)) == 2
    assert "has no manifest.json" in capsys.readouterr().err
    assert shears("pack", str(folder), "--pattern", "2:4") == 0
    assert f"packed {len(names)} tensors (2:4) into {PACKED_DIR}/{SPARSE_FILE}" in capsys.readouterr().out
    assert sorted(read_packed(folder)) == sorted(names)
    assert shears("pack", str(folder), "--pattern", "1:4") == 2
    assert "no decoder-block weight fits pattern 1:4" in capsys.readouterr().err
    assert shears("unpack", str(folder), "--out", str(tmp_path / "dense")) == 0
    assert f"restored {len(names)} tensors" in capsys.readouterr().out
    assert shears("unpack", str(folder), "--out", str(folder)) == 2


def test_cli_pack_follows_manifest(
    pruned_24: tuple[Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, names = pruned_24
    folder = tmp_path / "model"
    shutil.copytree(source, folder)
    chosen = sorted(names)[:2]
    layers = {name.removesuffix(".weight"): {} for name in chosen}
    (folder / "manifest.json").write_text(json.dumps({"request": {"pattern": "2:4"}, "layers": layers}))
    assert shears("pack", str(folder)) == 0
    assert sorted(read_packed(folder)) == chosen
    assert shears("pack", str(folder), "--pattern", "4:8") == 2
    assert "the manifest says pattern 2:4" in capsys.readouterr().err
    assert shears("bench", str(folder), "--m", "1") == 0
    out = capsys.readouterr().out
    assert "packed layers: 2" in out and "wrote bench.json and bench.png" in out


def test_bench_without_manifest_guesses_or_takes_the_pattern(
    pruned_24: tuple[Path, list[str]], tmp_path: Path
) -> None:
    source, names = pruned_24
    folder = tmp_path / "model"
    shutil.copytree(source, folder)
    guessed = run_benchmark(folder)["sizes"]
    assert guessed["source"] == "memory" and len(guessed["layers"]) == len(names)
    assert {r["pattern"] for r in guessed["layers"]} == {"2:4"}
    told = run_benchmark(folder, pattern=(2, 4), names=sorted(names)[:3])["sizes"]
    assert [r["name"] for r in told["layers"]] == sorted(names)[:3]


def test_gpu_chart_and_summary_render(tmp_path: Path) -> None:
    """The GPU-only report parts (filled by a GPU run) render: one speedup panel per shape, terminal lines."""
    from shears.kernels.chart import write_chart

    rows = [
        {
            "layer": name,
            "shape": [n, 4096],
            "pattern": "2:4",
            "m": m,
            "shears_us": 6.0,
            "dense_us": 10.0,
            "semi_us": None if m < 64 else 9.0,
            "dispatch": "triton:m1n16k256s4w4st3",
            "speedup_shears": 10 / 6,
            "speedup_semi": None if m < 64 else 10 / 9,
            "speedup_dispatch": 10 / 6,
        }
        for name, n in (("q_proj", 4096), ("k_proj", 1024))
        for m in (1, 16, 2048)
    ]
    result = {
        "device": {"name": "NVIDIA H100"},
        "kernels": rows,
        "sizes": {"total": {"layers": 2, "packed_bytes": 9, "dense_bytes": 16, "ratio": 0.5625}},
        "decode": {
            "packed_tokens_per_s": 150.0,
            "dense_tokens_per_s": 100.0,
            "speedup": 1.5,
            "tokens_agree": 1.0,
        },
    }
    assert write_chart(result, tmp_path / "bench.png") is None
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    text = cli.summary(result)
    assert (
        "q_proj 4096x4096" in text
        and "x1.67" in text
        and "decode: 150.0 tok/s packed vs 100.0 dense (x1.50)" in text
    )
