"""The OpenAPI document tells the truth: schemathesis calls every operation of a real server with requests
generated from /openapi.json (valid and invalid ones) and checks each answer against the document."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks

from livekit_proctor.settings import Settings
from livekit_proctor.wiring import analyzer_app
from tests.conftest import ADMIN_KEY, PROCTOR_KEY, LiveServer

CHECKS = [
    checks.not_a_server_error,  # no 5xx
    checks.status_code_conformance,  # every status answered is documented for the operation
    checks.content_type_conformance,  # with the documented content type
    checks.response_schema_conformance,  # and a body that validates against the documented schema
    checks.negative_data_rejection,  # a request the schema forbids is refused (4xx), not taken
]
# Examples per operation and generation phase; a few hundred requests in all, the same ones every run.
EXAMPLES = 25

calls: Counter[str] = Counter()


@pytest.fixture(scope="module")
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    srv = LiveServer(tmp_path_factory.mktemp("openapi")).start()
    yield srv
    srv.stop()
    print(f"\nschemathesis: {len(calls)} operations, {sum(calls.values())} requests: {dict(calls)}")


# The document the server serves (test_served_document_is_this_one), built without starting anything, so
# that pytest can collect one test per operation. (schemathesis.pytest.from_fixture, which would load it from
# the running server, fails on pytest 9: it sets a private node attribute pytest no longer has.)
DOC = analyzer_app(Settings(data_dir=Path("unused"))).openapi()
schema = schemathesis.openapi.from_dict(DOC)


@schema.parametrize()
@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_answer_is_documented(case: Any, api_server: LiveServer) -> None:
    calls[case.operation.label] += 1
    case.call_and_validate(base_url=api_server.base, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, checks=CHECKS)


def test_a_session_flow_answers_as_documented(api_server: LiveServer) -> None:
    """The answers random ids rarely reach (an existing session, its conflicts, other roles), each checked
    against the document: a documented status with a body of its schema."""
    body = {"exam_session_id": "flow-1", "candidate_id": "alice", "exam_id": "e", "metadata": {"room": "r1"}}
    start, sid = "/api/v1/session/start", "/api/v1/session/{session_id}"
    with api_server.http(ADMIN_KEY) as admin, api_server.http(PROCTOR_KEY) as proctor, api_server.http(None) as anon:
        steps = [
            (200, "POST", start, admin.post(start, json=body)),
            (409, "POST", start, admin.post(start, json={**body, "candidate_id": "bob"})),
            (413, "POST", start, admin.post(start, json={**body, "metadata": {"x": "a" * (2 << 20)}})),
            (422, "POST", start, admin.post(start, json={**body, "rules": {"NOPE": {}}})),
            (401, "POST", start, anon.post(start, json=body)),
            (403, "POST", start, proctor.post(start, json=body)),
            (200, "POST", f"{sid}/token", admin.post("/api/v1/session/flow-1/token")),
            (200, "GET", sid, proctor.get("/api/v1/session/flow-1")),
            (200, "GET", sid, anon.get("/api/v1/session/flow-1", headers={"X-API-Key": PROCTOR_KEY})),
            (200, "GET", "/api/v1/admin/sessions", admin.get("/api/v1/admin/sessions", params={"state": "active"})),
            (200, "GET", "/api/v1/admin/stats", admin.get("/api/v1/admin/stats")),
            (403, "GET", "/api/v1/admin/stats", proctor.get("/api/v1/admin/stats")),
            (200, "POST", f"{sid}/end", admin.post("/api/v1/session/flow-1/end")),
            (409, "POST", f"{sid}/token", admin.post("/api/v1/session/flow-1/token")),
            (200, "GET", "/metrics", admin.get("/metrics")),
            (401, "GET", "/metrics", anon.get("/metrics")),
            (403, "GET", "/metrics", proctor.get("/metrics")),
            (200, "GET", "/.well-known/ready", anon.get("/.well-known/ready")),
        ]
    for status, method, path, r in steps:
        assert r.status_code == status, (method, path, r.text)
        assert str(status) in DOC["paths"][path][method.lower()]["responses"], (method, path, status)
        schema[path][method].validate_response(r)


def test_served_document_is_this_one(api_server: LiveServer) -> None:
    with api_server.http(None) as c:
        assert c.get("/openapi.json").json() == DOC


def test_document_declares_auth_and_errors() -> None:
    """What generated clients rely on: both ways to present a key, and the error bodies."""
    doc = DOC
    schemes = doc["components"]["securitySchemes"]
    assert {s["type"] for s in schemes.values()} == {"http", "apiKey"}
    assert any(s.get("scheme") == "bearer" for s in schemes.values())
    assert any(s.get("name") == "X-API-Key" and s.get("in") == "header" for s in schemes.values())
    start = doc["paths"]["/api/v1/session/start"]["post"]
    assert {"401", "403", "409", "413", "422"} <= start["responses"].keys()
    assert len(start["security"]) == 2  # either scheme
    assert start["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ValidationErrorBody")
    metrics = doc["paths"]["/metrics"]["get"]["responses"]
    assert list(metrics["200"]["content"]) == ["text/plain"]
    assert list(metrics["401"]["content"]) == ["application/json"]
    assert "503" in doc["paths"]["/.well-known/ready"]["get"]["responses"]
    assert "HTTPValidationError" not in str(doc)  # FastAPI's 422 shape is not what the server answers
