"""bench-memory's parts: run specs, memory.stat parsing, and a real cgroup that bounds a real child."""

from __future__ import annotations

import sys

import pytest

from bench.memory_cgroup import (
    AnonymousPeak,
    anonymous_bytes,
    cgroup_available,
    in_cgroup,
    markdown,
    memory_cgroup,
    oom_kills,
    parse_run,
)
from bench.peers.measure import run_child


def test_run_specs_hold_n_m_patterns_and_flags() -> None:
    assert parse_run("sparsegpt:2:4") == ("sparsegpt", "2:4", [])
    assert parse_run("wanda:unstructured") == ("wanda", "unstructured", [])
    assert parse_run("sparsegpt:2:4:--variant=paper") == ("sparsegpt", "2:4", ["--variant", "paper"])


def test_anonymous_bytes_reads_total_rss_not_rss() -> None:
    stat = "cache 4096\nrss 100\nmapped_file 0\ntotal_cache 8192\ntotal_rss 12288\n"
    assert anonymous_bytes(stat) == 12288
    with pytest.raises(ValueError, match="total_rss"):
        anonymous_bytes("cache 1\nrss 2\n")


def test_markdown_reads_results_with_and_without_the_anonymous_peak() -> None:
    base = {"run": "wanda:unstructured", "fits": True, "exit": 0, "peak_rss_mb": 900.0}
    data = {
        "date": "d",
        "model": {"hidden": 8, "layers": 1, "intermediate": 16, "parameters": 1e6, "bytes": 4e6},
        "fraction": 0.5,
        "limit_bytes": 2 * 2**20,
        "samples": 2,
        "seqlen": 8,
        "machine": "m",
        "results": [
            {**base, "cgroup_max_usage_mb": 2.0, "wall_s": 1.0, "variant": {"variant": "refit"}},
            {
                **base,
                "fits": False,
                "exit": -9,
                "cgroup_max_usage_mb": 2.0,
                "wall_s": 1.0,
                "peak_anonymous_mb": 1.5,
            },
        ],
    }
    table = [line for line in markdown(data).splitlines() if line.startswith("| wanda")]
    assert table[0].split("|")[2:6] == [" refit ", " yes ", " 0 ", "  "]
    assert table[1].split("|")[3:6] == [" NO ", " -9 ", " 2 "]


@pytest.mark.skipif(not cgroup_available(), reason="needs root and the cgroup v1 memory controller")
def test_a_real_cgroup_bounds_a_child_and_the_sampler_sees_its_heap(tmp_path) -> None:
    """A child that holds 64 MiB fits under 256 MiB and its anonymous peak is seen; one that asks for
    512 MiB is killed by the kernel under the same limit (memory.oom_control counts the kill)."""
    hold = "import time; b = bytearray({n} << 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.6)"
    with memory_cgroup("shears-test-fits", 256 << 20) as group, AnonymousPeak(group, 0.05) as peak:
        fits = run_child(in_cgroup(group, [sys.executable, "-c", hold.format(n=64)]), tmp_path / "fits.log")
    assert fits.returncode == 0
    assert 64 <= peak.peak / 2**20 < 256
    with memory_cgroup("shears-test-killed", 256 << 20) as group:
        killed = run_child(in_cgroup(group, [sys.executable, "-c", hold.format(n=512)]), tmp_path / "k.log")
        kills = oom_kills(group)
    assert killed.returncode == -9 and kills != 0  # -1: a kernel before 4.13 does not count kills
