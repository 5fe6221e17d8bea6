"""Compile Shears' Triton kernels for a GPU target without a GPU (ahead of time, to PTX and cubin).

The interpreter accepts programs the compiler rejects (and vice versa), so this is how a session with
no GPU learns that the kernels build for sm_90 and what they cost in registers, spills and shared memory:
    PYTHONPATH=. .venv/bin/python -m kernels.aot_check --arch 90 [--all]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from shears.kernels.configs import KernelConfig, candidate_configs
from shears.kernels.registry import FORMATS, format_of

_TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


@dataclass(frozen=True)
class Variant:
    layout: str  # a key of registry.FORMATS
    dtype: str  # torch dtype name
    config: KernelConfig
    n: int = 2
    m: int = 4


def _signature(variant: Variant) -> tuple[object, dict[str, str], dict[str, object]]:
    cfg, ty = variant.config, _TYPES[variant.dtype]
    module = format_of(variant.layout).kernel_module()
    kernel, pointers, ints, constants = module.aot_signature(cfg, ty, variant.n, variant.m)
    pointers |= {"out_ptr": f"*{ty}", "partial_ptr": "*fp32", "counter_ptr": "*i32"}
    ints += ["plane", "tiles_per_split", "splits"]
    if not cfg.gemv:
        ints.insert(0, "M")
        constants.update(BLOCK_M=cfg.block_m, IEEE=variant.dtype == "float32", UPCAST=False)
    constants.update(BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, USE_SPLIT=cfg.split_k > 1)
    signature = dict(pointers) | {name: "i32" for name in ints} | {name: "constexpr" for name in constants}
    return kernel, signature, constants


def compile_variant(variant: Variant, arch: int = 90) -> dict[str, object]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, signature, constants = _signature(variant)
    # ASTSource wants the parameters in the kernel's own order.
    order = kernel.arg_names
    signature = {name: signature[name] for name in order}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
    options = {"num_warps": variant.config.num_warps, "num_stages": variant.config.num_stages}
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    return {
        "layout": variant.layout,
        "dtype": variant.dtype,
        "pattern": f"{variant.n}:{variant.m}",
        "config": str(variant.config),
        "shared_bytes": compiled.metadata.shared,
        **resource_usage(compiled.asm["cubin"]),
    }


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers per thread and stack (spill) bytes, from the cubin via triton's bundled cuobjdump."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([str(tool), "-res-usage", str(path)], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", text)
    return {"registers": int(found[1]), "stack_bytes": int(found[2])} if found else {}


QUICK = [
    Variant("nm", "bfloat16", KernelConfig(1, 16, 256, 4)),
    Variant("bitmask", "bfloat16", KernelConfig(16, 16, 128, 2)),
]


def variants(all_configs: bool) -> list[Variant]:
    shapes = [(4096, 4096), (14336, 4096)] if all_configs else [(4096, 4096)]
    found: list[Variant] = []
    for layout, record in FORMATS.items():
        for dtype in ("bfloat16", "float16") if all_configs else ("bfloat16",):
            for n, k in shapes:
                for m in (1, 16, 512):
                    configs = candidate_configs(n, k, m, record.launches)
                    for config in configs if all_configs else configs[:1]:
                        variant = Variant(layout, dtype, config)
                        if variant not in found:
                            found.append(variant)
    found.append(Variant("nm", "float32", KernelConfig(16, 32, 64, 2)))
    found.append(Variant("nm", "bfloat16", KernelConfig(1, 32, 256, 4), n=4, m=8))
    found.append(Variant("nm", "bfloat16", KernelConfig(16, 32, 256, 4), n=1, m=4))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    parser.add_argument("--all", action="store_true", help="every tuning candidate, not one per M bucket")
    parser.add_argument("--quick", action="store_true", help="one split-K GEMV and one GEMM per layout (CI)")
    args = parser.parse_args(argv)
    chosen = QUICK if args.quick else variants(args.all)
    failures = 0
    for variant in chosen:
        try:
            print(json.dumps(compile_variant(variant, args.arch)), flush=True)
        except Exception as exc:  # report every variant, then fail
            failures += 1
            print(
                json.dumps(
                    {"layout": variant.layout, "config": str(variant.config), "error": str(exc)[:2000]}
                )
            )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
