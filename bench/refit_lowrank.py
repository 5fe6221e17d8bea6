"""Would a low-rank Hessian make Wanda's re-fit cheap enough? A layer-level proxy on SmolLM2.

Wanda's re-fit (4 CG steps under (1 - s) H + s diag(H) + d I, s = 0.5) costs five `[rows, K] x
[K, K]` products per layer: at hidden 2048 it and the Hessians are what keep Wanda's default above
0.5x the peer's time. A rank-r approximation of H with its diagonal kept exact, H_r = Q (Q^T H Q)
Q^T + diag(H - Q (Q^T H Q) Q^T), would make each product ~2r/K of that. This measures what it keeps
of the re-fit's gain where it counts, on text of the other domain: for 16 layers of SmolLM2 (blocks
2, 12, 22, 28: q, o, up, down), Hessians from 32 x 512 calibration tokens of each domain (block
inputs of the dense model), Wanda's mask from one domain's norms, the kept weights re-fitted under
that domain's H or H_r, and the relative error ||dW X||^2 / ||W X||^2 under the *other* domain's H
(and the same domain's). Ratios are to plain Wanda's error on the same layer; the geometric mean
over layers is reported per calibration domain, pattern and fit. Q: the top-r eigenvectors of H
(the best rank r), or a randomised range finder (Gaussian sketch, 0 or 1 power step).

    PYTHONPATH=$PWD .venv/bin/python bench/refit_lowrank.py  # ~5 min on 2 cores

A layer proxy only (no compounding through depth, dense-model inputs): it ranks fits, it does not
give perplexities. Results: bench/results/refit-lowrank-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from datetime import date
from pathlib import Path

import torch

from bench.peers.domains import domain_windows
from shears.pattern import Pattern
from shears.pruning.masks import apply_mask, prune_mask
from shears.pruning.solvers import layer_error
from shears.pruning.solvers.reconstruct import reconstruct_masked
from shears.pruning.solvers.wanda import wanda_scores
from shears.pruning.stats import HessianAccumulator

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = (2, 12, 22, 28)
LAYERS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")
# (label, how Q is found, r as a fraction K / r of the layer's inputs, power steps); K / 0: the full H.
FITS = [("full", "", 0, 0)] + [
    (f"{kind}{steps if kind == 'sketch' else ''} r=K/{k}", kind, k, steps)
    for kind, steps in (("eig", 0), ("sketch", 0), ("sketch", 1))
    for k in (16, 8, 4)
]
DOMAINS = ("shakespeare", "gsm8k")
SHRINK, DAMP, STEPS = 0.5, 0.1, 4  # Wanda's defaults (pruning.methods.WandaOptions)


def hessians(model: torch.nn.Module, names: list[str], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each named layer's H from the dense model's forward over `ids`, with the engine's accumulator."""
    modules = dict(model.named_modules())
    accs = {name: HessianAccumulator(modules[name].in_features, "cpu") for name in names}
    hooks = [
        modules[name].register_forward_pre_hook(lambda _, args, name=name: accs[name].add(args[0]))
        for name in names
    ]
    with torch.no_grad():
        for start in range(0, ids.shape[0], 4):
            model(ids[start : start + 4])
    for hook in hooks:
        hook.remove()
    return {name: acc.hessian.clone() for name, acc in accs.items()}


def low_rank(hessian: torch.Tensor, rank: int, kind: str, power_steps: int) -> torch.Tensor:
    """H_r = Q (Q^T H Q) Q^T with H's own diagonal (fp64 inside, fp32 out)."""
    h = hessian.double()
    if kind == "eig":
        _, vectors = torch.linalg.eigh(h)
        q = vectors[:, -rank:]
    else:
        sketch = torch.randn(h.shape[0], rank, generator=torch.Generator().manual_seed(0), dtype=h.dtype)
        y = h @ sketch
        for _ in range(power_steps):
            y = h @ torch.linalg.qr(y).Q
        q = torch.linalg.qr(y).Q
    approx = q @ (q.T @ h @ q) @ q.T
    approx.diagonal().copy_(h.diagonal())
    return approx.float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / f"refit-lowrank-{date.today()}.json"
    )
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shears.pruning.config import EngineOptions
    from shears.pruning.models import resolve_model

    torch.manual_seed(0)
    started = time.time()
    folder = resolve_model("smollm2-135m", None, EngineOptions()).path
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    names = [f"model.layers.{block}.{layer}" for block in BLOCKS for layer in LAYERS]
    weights = {
        name: module.weight.detach().float().clone()
        for name, module in model.named_modules()
        if name in names
    }
    stats = {}
    for domain in DOMAINS:
        windows = domain_windows(
            domain,
            ROOT / "bench" / "work" / "lowrank",
            tokenizer,
            samples=args.samples,
            seqlen=args.seqlen,
            eval_seqlen=args.seqlen,
            eval_tokens=args.seqlen,
        )
        stats[domain] = hessians(model, names, windows.calibration[: args.samples])
    ratios: dict[str, list[tuple[float, float]]] = {}
    for calibration, other in (DOMAINS, DOMAINS[::-1]):
        for pattern in (Pattern.parse("unstructured"), Pattern.parse("2:4")):
            for name in names:
                hessian, held_out, dense = stats[calibration][name], stats[other][name], weights[name]
                drop = prune_mask(wanda_scores(dense, hessian.diagonal()), 0.5, pattern, per_row=True)
                plain = apply_mask(dense, drop)
                base = layer_error(dense, plain, held_out), layer_error(dense, plain, hessian)
                damping = DAMP * float(hessian.diagonal().mean())
                for label, kind, fraction, power_steps in FITS:
                    fit_h = (
                        low_rank(hessian, hessian.shape[0] // fraction, kind, power_steps)
                        if fraction
                        else hessian
                    )
                    fitted = reconstruct_masked(dense, plain, fit_h, damping, STEPS, drop=drop, shrink=SHRINK)
                    errors = layer_error(dense, fitted, held_out), layer_error(dense, fitted, hessian)
                    key = f"{calibration}->{other} {pattern} {label}"
                    ratios.setdefault(key, []).append((errors[0] / base[0], errors[1] / base[1]))
    summary = {
        key: {
            "other_domain": math.exp(sum(math.log(o) for o, _ in pairs) / len(pairs)),
            "same_domain": math.exp(sum(math.log(s) for _, s in pairs) / len(pairs)),
        }
        for key, pairs in ratios.items()
    }
    for key, value in summary.items():
        print(f"{key:48s} other {value['other_domain']:.3f} same {value['same_domain']:.3f}")
    args.out.write_text(
        json.dumps(
            {
                "what": __doc__.splitlines()[0],
                "layers": names,
                "calibration": f"{args.samples} x {args.seqlen} tokens per domain",
                "fit": {"shrink": SHRINK, "refit_damp": DAMP, "steps": STEPS},
                "ratio_to_plain_wanda_geomean": summary,
                "seconds": round(time.time() - started, 1),
            },
            indent=1,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
