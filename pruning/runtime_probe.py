"""Greedy generation in one runtime, run as a script in that runtime's own Python: imports no Shears module.

    python -I runtime_probe.py SPEC.json RESULT.json

SPEC: {"runtime": "transformers" | "vllm", "max_tokens": 16, "dtype": "bfloat16", "top_logprobs": 10,
"prompts": [text, ...], "folders": [{"path": folder, "prompt_ids": [[id, ...], ...],
"reference": [[id, ...], ...]}]}. transformers tokenizes `prompts` with each folder's tokenizer (fixed
ids without one); vLLM takes each folder's `prompt_ids`, and also scores the `reference` continuations
(the transformers tokens) teacher-forced, so the two runtimes' logits are compared at every step even
where bf16 rounding makes their greedy paths part.

RESULT: {"runtime", "version", "error", "folders": {path: {"loaded", "error", "seconds", "prompt_ids",
"tokens": [[id, ...] per prompt], "logprobs": [[{id: logprob} per step] per prompt],
"eos_token_ids" (transformers), "reference_logprobs" (vLLM: the same for the reference tokens)}}};
each step's dict holds the `top_logprobs` likeliest tokens (raw logits, before any processor) and the
one generated (or scored).

Each folder is loaded and generated from in turn, in this one process (a runtime's import is its
largest fixed cost); a folder that fails to load is recorded, not raised. vLLM runs with no engine
or worker processes of its own (VLLM_ENABLE_V1_MULTIPROCESSING=0, the "uni" executor), eager, without
the folder's generation defaults, so both runtimes decode plain greedy.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

# Fallback prompt ids for a folder without a tokenizer (a token-id job's output): spread over the vocab.
_ID_STRIDE = 7919


def _fallback_ids(vocab_size: int, count: int) -> list[list[int]]:
    return [[(i * _ID_STRIDE + 13 * p) % vocab_size for i in range(1, 9)] for p in range(count)]


def _error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 2000 else text[:2000] + " ..."


# -------------------------------------------------------------------------------------- transformers


def _transformers_folder(entry: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder = entry["path"]
    dtype = getattr(torch, spec.get("dtype", "bfloat16"))
    prompts = entry.get("prompt_ids")
    if prompts is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
            prompts = [tokenizer(text)["input_ids"] for text in spec["prompts"]]
        except (OSError, ValueError):  # no tokenizer files: fixed ids
            config = AutoConfig.from_pretrained(folder)
            prompts = _fallback_ids(config.vocab_size, len(spec["prompts"]))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    top = int(spec.get("top_logprobs", 10))
    greedy = GenerationConfig(
        do_sample=False,
        max_new_tokens=spec["max_tokens"],
        min_new_tokens=spec["max_tokens"],
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    tokens, logprobs = [], []
    with torch.inference_mode():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), generation_config=greedy)
            new = out.sequences[0, len(ids) :].tolist()
            steps = []
            for token, logits in zip(new, out.logits, strict=True):
                scores = torch.log_softmax(logits[0].float(), dim=-1)
                best = torch.topk(scores, top)
                step = {
                    str(i): float(v) for i, v in zip(best.indices.tolist(), best.values.tolist(), strict=True)
                }
                step[str(token)] = float(scores[token])
                steps.append(step)
            tokens.append(new)
            logprobs.append(steps)
    eos = model.generation_config.eos_token_id
    del model
    # Both runtimes hold EOS back for max_tokens steps (min_new_tokens / ignore_eos), so the token they
    # pick is the best one but EOS: the caller leaves these out when it compares with the best.
    eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return {"prompt_ids": prompts, "tokens": tokens, "logprobs": logprobs, "eos_token_ids": eos_ids}


# ---------------------------------------------------------------------------------------------- vLLM


def _steps(logprobs: Any) -> list[dict[str, float]]:
    return [{str(t): float(lp.logprob) for t, lp in step.items()} for step in logprobs]


def _vllm_folder(entry: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    folder, prompts, reference = entry["path"], entry["prompt_ids"], entry.get("reference") or []
    has_tokenizer = any((Path(folder) / name).exists() for name in ("tokenizer.json", "tokenizer.model"))
    longest = max(len(ids) for ids in prompts) + spec["max_tokens"] + 1
    llm = LLM(
        model=folder,
        dtype=spec.get("dtype", "bfloat16"),
        enforce_eager=True,
        max_model_len=max(64, -(-longest // 64) * 64),
        max_num_seqs=len(prompts) + len(reference),
        seed=0,
        distributed_executor_backend="uni",
        generation_config="vllm",
        skip_tokenizer_init=not has_tokenizer,
    )
    top = int(spec.get("top_logprobs", 10))
    try:
        greedy = SamplingParams(
            temperature=0.0,
            max_tokens=spec["max_tokens"],
            min_tokens=spec["max_tokens"],
            ignore_eos=True,
            logprobs=top,
            detokenize=False,
        )
        # The reference continuation as a prompt: its prompt logprobs are this runtime's logits there.
        scoring = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=top, detokenize=False)
        requests = [{"prompt_token_ids": ids} for ids in prompts]
        scored = [{"prompt_token_ids": ids + ref} for ids, ref in zip(prompts, reference, strict=True)]
        outputs = llm.generate(
            requests + scored, [greedy] * len(requests) + [scoring] * len(scored), use_tqdm=False
        )
        tokens = [list(out.outputs[0].token_ids) for out in outputs[: len(requests)]]
        logprobs = [_steps(out.outputs[0].logprobs) for out in outputs[: len(requests)]]
        # prompt_logprobs[p] is the distribution over token p given the tokens before it (p = 0: None)
        reference_logprobs = [
            _steps(out.prompt_logprobs[len(ids) :])
            for ids, out in zip(prompts, outputs[len(requests) :], strict=True)
        ]
    finally:
        del llm
        gc.collect()
        try:  # a second LLM in this process needs the first one's distributed state gone
            from vllm.distributed import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
        except Exception:  # best effort; the next load reports any real problem
            pass
    return {
        "prompt_ids": prompts,
        "tokens": tokens,
        "logprobs": logprobs,
        "reference_logprobs": reference_logprobs,
    }


def _versions(runtime: str) -> str:
    if runtime == "vllm":
        import vllm

        return str(vllm.__version__)
    import transformers

    return str(transformers.__version__)


RUNNERS = {"transformers": _transformers_folder, "vllm": _vllm_folder}


def run(spec: dict[str, Any]) -> dict[str, Any]:
    runtime = spec["runtime"]
    runner = RUNNERS[runtime]
    result: dict[str, Any] = {"runtime": runtime, "version": None, "error": None, "folders": {}}
    try:
        result["version"] = _versions(runtime)
    except Exception as exc:  # reported to the caller as the runtime's failure
        result["error"] = _error(exc)
        return result
    for folder in spec["folders"]:
        start = time.perf_counter()
        entry: dict[str, Any] = {"loaded": False, "error": None}
        try:
            entry.update(runner(folder, spec), loaded=True)
        except Exception as exc:  # one folder's failure is that folder's result
            entry["error"] = _error(exc)
            traceback.print_exc()
        entry["seconds"] = round(time.perf_counter() - start, 2)
        result["folders"][folder["path"]] = entry
        print(
            f"[probe] {runtime} {folder['path']}: loaded={entry['loaded']} {entry['seconds']}s",
            file=sys.stderr,
        )
    return result


def main(argv: list[str]) -> int:
    spec_path, result_path = Path(argv[0]), Path(argv[1])
    spec = json.loads(spec_path.read_text())
    if spec["runtime"] == "vllm":
        # One process: no engine-core or worker children to start, import vLLM in, and clean up.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; 16-token checks need little
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # share the cores, pin nothing
    result = run(spec)
    tmp = result_path.with_name(result_path.name + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, result_path)
    return 0


if __name__ == "__main__":  # vLLM starts processes by spawning this file again: keep work under here
    sys.exit(main(sys.argv[1:]))
