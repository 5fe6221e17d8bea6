"""Things defined once and read elsewhere stay that way: error codes, operator options, the request type."""

from __future__ import annotations

import importlib

from shears.errors import JOB_ERROR_CODES, ShearsError
from shears.pruning.config import EngineOptions, OperatorOptions, PruneRequest
from shears.pruning.methods import METHODS, NO_METHOD
from shears.server.schemas import JobError, JobOut
from shears.server.settings import Settings

# Every module that defines an error class.
_ERROR_MODULES = ("shears.errors", "shears.kernels.errors", "shears.server.artifacts")


def _subclasses(cls: type) -> set[type]:
    found = set(cls.__subclasses__())
    for sub in list(found):
        found |= _subclasses(sub)
    return found


def test_every_error_code_is_listed_once() -> None:
    for name in _ERROR_MODULES:
        importlib.import_module(name)
    codes = {cls.code for cls in _subclasses(ShearsError) | {ShearsError}}
    assert codes <= set(JOB_ERROR_CODES), codes - set(JOB_ERROR_CODES)
    assert JobError.model_json_schema()["properties"]["code"]["enum"] == list(JOB_ERROR_CODES)


def test_settings_declare_the_engine_options_from_one_place() -> None:
    for name, field in OperatorOptions.model_fields.items():
        for model in (Settings, EngineOptions):
            theirs = model.model_fields[name]
            assert (theirs.default, theirs.metadata) == (field.default, field.metadata), (model, name)
    shared = Settings(max_shard_bytes=1 << 12, allow_pickle=True).engine_options()
    assert (shared.max_shard_bytes, shared.allow_pickle, shared.trust_remote_code) == (1 << 12, True, False)


def test_job_schema_carries_the_request_type() -> None:
    schema = JobOut.model_json_schema()
    request = schema["properties"]["request"]
    if "$ref" in request:
        request = schema["$defs"][request["$ref"].rsplit("/", 1)[-1]]
    methods = request["properties"]["method"]["enum"]
    assert request["title"] == "PruneRequest" and methods == [*METHODS, NO_METHOD]
    assert request["properties"]["pattern"]["type"] == "string"
    assert set(request["properties"]) == set(PruneRequest.model_fields)


def test_request_schema_defaults_are_valid_request_values() -> None:
    """A client that fills in the documented defaults must send a request the server accepts."""
    properties = PruneRequest.model_json_schema()["properties"]
    base = {"model": "smollm2-135m", "method": "wanda", "sparsity": 0.5}
    for name, prop in properties.items():
        if "default" in prop:
            request = PruneRequest.model_validate({**base, name: prop["default"]})
            assert request.model_dump(mode="json")[name] == prop["default"], name
