"""Where calibration and evaluation text comes from: a source spec -> an iterator of documents.

Specs:
- `builtin`: the offline corpus of `calibration.builtin` (its calibration split).
- a local path: `.txt` (the whole file is ONE document: splitting prose on blank lines would put an EOS
  token between every paragraph), `.jsonl` (one JSON object per line, text in `text_column`, default
  "text"), `.parquet` (same column rule). `.safetensors` token files hold token ids, not text: see
  `token_file` and `calibration.windows`.
- `hf:<dataset>[:<config>[:<split>]]`: `datasets.load_dataset(..., streaming=True)`, split "train" by
  default, so only the rows actually used are fetched. A local data folder works as the dataset too.
- `upload:<id>`: the file `<uploads_dir>/<id>.<ext>` (ext one of SUFFIXES) that the server stored.
- `self`: text sampled from the model being pruned; the engine supplies it (see `calibration.windows`).

Documents are yielded lazily and stripped; documents with no text are skipped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from shears.calibration.builtin import builtin_documents
from shears.errors import CalibrationError

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
TOKEN_SUFFIX = ".safetensors"
SUFFIXES = (*TEXT_SUFFIXES, TOKEN_SUFFIX)
DEFAULT_TEXT_COLUMN = "text"
UPLOAD_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

_HF_PREFIX = "hf:"
_UPLOAD_PREFIX = "upload:"


@dataclass(frozen=True)
class HFSpec:
    dataset: str
    config: str | None = None
    split: str = "train"


def parse_hf_spec(spec: str) -> HFSpec:
    """`hf:<dataset>[:<config>[:<split>]]` -> HFSpec; empty config means the dataset's default."""
    if not spec.startswith(_HF_PREFIX):
        raise CalibrationError(f"source {spec!r} is not an 'hf:<dataset>[:<config>[:<split>]]' spec")
    parts = spec[len(_HF_PREFIX) :].split(":")
    if len(parts) > 3 or not parts[0] or any(p != p.strip() or " " in p for p in parts):
        raise CalibrationError(
            f"source {spec!r}: expected 'hf:<dataset>[:<config>[:<split>]]', e.g. 'hf:allenai/c4:en:train' "
            "(no spaces, at most three ':'-separated parts)"
        )
    dataset, config, split = (*parts, None, None)[:3]
    if split == "":
        raise CalibrationError(f"source {spec!r}: the split after the second ':' is empty; e.g. ':train'")
    return HFSpec(dataset=dataset, config=config or None, split=split or "train")


def is_local_path(spec: str) -> bool:
    """Whether the spec reads a file or folder of this machine named by the requester (not an upload)."""
    if spec in ("builtin", "self") or spec.startswith(_UPLOAD_PREFIX):
        return False
    if spec.startswith(_HF_PREFIX):
        dataset = spec[len(_HF_PREFIX) :].split(":")[0]
        return dataset.startswith((".", "/", "~")) or Path(dataset).exists()
    return True


def resolve_upload(spec: str, uploads_dir: Path | None) -> Path:
    """`upload:<id>` -> the stored file; the id is validated before any path is built from it."""
    upload_id = spec[len(_UPLOAD_PREFIX) :]
    if not UPLOAD_ID.fullmatch(upload_id):
        raise CalibrationError(
            f"source {spec!r}: an upload id is 1-64 characters of letters, digits, '_' or '-'"
        )
    if uploads_dir is None:
        raise CalibrationError(f"source {spec!r}: uploads are not enabled on this server (no uploads_dir)")
    found = [uploads_dir / f"{upload_id}{suffix}" for suffix in SUFFIXES]
    found = [path for path in found if path.is_file()]
    if not found:
        raise CalibrationError(f"source {spec!r}: no upload with id {upload_id!r}; upload the file first")
    if len(found) > 1:
        raise CalibrationError(
            f"source {spec!r}: several uploads share id {upload_id!r}: {[p.name for p in found]}"
        )
    return found[0]


def source_file(spec: str, *, uploads_dir: Path | None) -> Path | None:
    """The file a path or upload spec names (checked to exist, with a supported suffix); None otherwise."""
    if spec in ("builtin", "self") or spec.startswith(_HF_PREFIX):
        return None
    path = resolve_upload(spec, uploads_dir) if spec.startswith(_UPLOAD_PREFIX) else Path(spec).expanduser()
    if path.suffix.lower() not in SUFFIXES:
        raise CalibrationError(
            f"source {spec!r}: unknown source; give 'builtin', 'self', 'hf:<dataset>[:<config>[:<split>]]', "
            f"'upload:<id>' or a file ending in one of {', '.join(SUFFIXES)}"
        )
    if not path.is_file():
        raise CalibrationError(f"source {spec!r}: file not found ({path.resolve()}); check the path")
    return path


def check_allowed(spec: str, *, allow_local_paths: bool) -> None:
    """Refuse files and folders named by path when the requester may not read this machine's disk."""
    if not allow_local_paths and is_local_path(spec):
        raise CalibrationError(
            f"source {spec!r}: local paths are not accepted here; upload the file and use 'upload:<id>'"
        )


def token_file(spec: str, *, uploads_dir: Path | None, allow_local_paths: bool = True) -> Path | None:
    """The `.safetensors` file of pre-tokenised windows that the spec names, if it names one."""
    check_allowed(spec, allow_local_paths=allow_local_paths)
    path = source_file(spec, uploads_dir=uploads_dir)
    return path if path is not None and path.suffix.lower() == TOKEN_SUFFIX else None


def open_source(
    spec: str, *, text_column: str | None, uploads_dir: Path | None, allow_local_paths: bool = True
) -> Iterator[str]:
    """Documents of a text source, lazily. `allow_local_paths=False` refuses paths a remote user names."""
    check_allowed(spec, allow_local_paths=allow_local_paths)
    if spec == "builtin":
        return builtin_documents("calibration")
    if spec == "self":
        raise CalibrationError("source 'self' is text generated by the model; it has no documents to open")
    if spec.startswith(_HF_PREFIX):
        return _hf_documents(spec, parse_hf_spec(spec), text_column or DEFAULT_TEXT_COLUMN)
    path = source_file(spec, uploads_dir=uploads_dir)
    assert path is not None
    suffix = path.suffix.lower()
    if suffix == TOKEN_SUFFIX:
        raise CalibrationError(f"source {spec!r} holds token ids, not text; use it as a calibration source")
    if suffix == ".txt":
        return _txt_documents(spec, path)
    if suffix == ".jsonl":
        return _jsonl_documents(spec, path, text_column or DEFAULT_TEXT_COLUMN)
    return _parquet_documents(spec, path, text_column or DEFAULT_TEXT_COLUMN)


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        if text := text.strip():
            yield text


def _txt_documents(spec: str, path: Path) -> Iterator[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"source {spec!r} is not UTF-8 text ({exc}); re-save it as UTF-8") from exc
    yield from _nonempty([text])


def _column_value(spec: str, record: object, column: str, where: str) -> str:
    if not isinstance(record, dict):
        raise CalibrationError(
            f"source {spec!r}, {where}: expected a JSON object, got {type(record).__name__}"
        )
    if column not in record:
        raise CalibrationError(
            f"source {spec!r}, {where}: no column {column!r}; columns found: {sorted(record)}. "
            "Set calibration.text_column to the one holding the text"
        )
    value = record[column]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise CalibrationError(
            f"source {spec!r}, {where}: column {column!r} holds {type(value).__name__}, not text; "
            "set calibration.text_column to a text column"
        )
    return value


def _jsonl_documents(spec: str, path: Path, column: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise CalibrationError(f"source {spec!r}, line {number}: not valid JSON ({exc})") from exc
            yield from _nonempty([_column_value(spec, record, column, f"line {number}")])


def _parquet_documents(spec: str, path: Path, column: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise CalibrationError(f"source {spec!r}: not a readable parquet file ({exc})") from exc
    schema = table.schema_arrow
    if column not in schema.names:
        raise CalibrationError(
            f"source {spec!r}: no column {column!r}; columns found: {schema.names}. "
            "Set calibration.text_column to the one holding the text"
        )
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise CalibrationError(
            f"source {spec!r}: column {column!r} has type {kind}, not text; set calibration.text_column"
        )
    for batch in table.iter_batches(batch_size=256, columns=[column]):
        yield from _nonempty(text or "" for text in batch.column(0).to_pylist())


def _hf_documents(spec: str, hf: HFSpec, column: str) -> Iterator[str]:
    import datasets

    def unreachable(exc: Exception) -> CalibrationError:
        return CalibrationError(
            f"source {spec!r}: could not stream Hugging Face dataset {hf.dataset!r} (config {hf.config!r}, "
            f"split {hf.split!r}): {exc}. Check the name, config and split and that the Hub is reachable, "
            "or download the data and give a local .jsonl/.parquet file"
        )

    try:
        rows = iter(datasets.load_dataset(hf.dataset, hf.config, split=hf.split, streaming=True))
    except Exception as exc:  # the Hub client raises many types (OSError, ValueError, FileNotFoundError...)
        raise unreachable(exc) from exc
    number = 0
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as exc:
            raise unreachable(exc) from exc
        number += 1
        yield from _nonempty([_column_value(spec, row, column, f"row {number}")])
