"""The OpenAPI document: valid OpenAPI 3.1, exactly the app's routes, and no request that
schemathesis generates from it makes the app answer with a server error."""

from __future__ import annotations

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from openapi_spec_validator import validate
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from imagerec.api import DEFAULT_ROUTES, create_app
from imagerec.config import Settings
from imagerec.hugcompat import hug
from imagerec.openapi import live_routes, openapi_document, undocumented_routes
from imagerec.repository import ModelRepository

EXAMPLES = 8  # per operation, mode and model name: about 600 requests, under a minute
CONFORMANCE = [status_code_conformance, content_type_conformance, response_schema_conformance]


def documented_routes(document: dict) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, operations in document["paths"].items()
        for method in operations
    }


@pytest.fixture(scope="module")
def app(protocol_predictor):
    return create_app(protocol_predictor, Settings(max_body_bytes=200_000))


def test_served_document_is_valid_openapi_31(live_server):
    response = requests.get(f"{live_server}/openapi.json", timeout=30)
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"] == "3.1.0"
    assert document["servers"] == [{"url": live_server}]  # what Postman's Import uses
    validate(document)


def test_document_describes_exactly_the_live_routes(live_server):
    api = create_app(ModelRepository(), Settings())
    assert undocumented_routes(api) == []
    served = requests.get(f"{live_server}/openapi.json", timeout=30).json()
    assert documented_routes(served) == live_routes(api)
    for route in [
        ("POST", "/v2/models/{name}/infer"),
        ("POST", "/v1/models/{name}:predict"),
        ("GET", "/openapi.json"),
        ("POST", "/v1/predict"),
    ]:
        assert route in live_routes(api)


def test_a_route_added_without_documentation_is_caught():
    def add_undocumented(api: hug.API) -> None:
        @hug.get("/v1/undocumented", api=api)
        def undocumented():
            return {}

    api = create_app(ModelRepository(), Settings(), routes=(*DEFAULT_ROUTES, add_undocumented))
    assert undocumented_routes(api) == [("GET", "/v1/undocumented")]
    assert "/v1/undocumented" not in openapi_document(api)["paths"]


def fuzz(operation, mode: GenerationMode, path: dict | None, found: dict[str, list]) -> None:
    """Send up to EXAMPLES generated requests to one operation; note each 5xx answer and each
    answer the document does not describe (status, content type, body schema)."""

    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,  # the same requests every run: a failure here is never a fluke
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def call(case):
        response = case.call()
        found["sent"].append(operation.label)
        if response.status_code >= 500:
            found["server errors"].append(f"{operation.label}: {response.status_code} {case!r}")
        try:
            case.validate_response(response, checks=CONFORMANCE)
        except BaseException as failure:  # schemathesis raises an exception group
            found["undocumented"].append(f"{operation.label}: {failure}"[:2000])

    try:
        call()
    except Unsatisfiable:
        if mode is GenerationMode.POSITIVE:
            raise  # only an operation with nothing to get wrong has no invalid requests


def test_no_generated_request_causes_a_server_error(app, protocol_predictor):
    """schemathesis: valid and invalid requests for every operation, a bounded number each, at
    random model names and at the served one (so bodies get parsed, not just 404'd)."""
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app.http.server())
    served = {"name": protocol_predictor.name, "version": protocol_predictor.version}
    found: dict[str, list] = {"sent": [], "server errors": [], "undocumented": []}
    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:
        path = {k: v for k, v in served.items() if f"{{{k}}}" in operation.path} or None
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            for path_parameters in [None, path] if path else [None]:
                fuzz(operation, mode, path_parameters, found)
    assert set(found["sent"]) == {operation.label for operation in operations}
    assert found["server errors"] == []
    assert found["undocumented"] == []
