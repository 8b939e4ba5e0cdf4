"""The error answers routes declare in the OpenAPI document (their bodies: proctor.contracts.api).

Declared as explicit JSON content (not `model=`), so a route whose success is not JSON (/metrics) still
declares JSON errors; analyzer.app puts the two body schemas into the document's components.
"""

from __future__ import annotations

from typing import Any

from livekit_proctor.contracts.api import ErrorBody, ValidationErrorBody, ValidationIssue

# The models the error answers reference: analyzer.app adds them to the OpenAPI components.
ERROR_MODELS = (ErrorBody, ValidationErrorBody, ValidationIssue)

DESCRIPTIONS = {
    400: "The body is not parseable JSON (e.g. nested too deeply)",
    401: "Missing or unknown API key",
    403: "The API key's role may not do this",
    404: "Unknown session",
    409: "Conflicts with the session's state",
    413: "Request body over the size limit (PROCTOR_MAX_REQUEST_BYTES)",
    422: "The request did not validate: one issue per bad field",
}
AUTH = (401, 403)


def errors(*codes: int, **notes: str) -> dict[int | str, dict[str, Any]]:
    """`responses=` of a route: the error statuses it can answer, e.g. errors(*AUTH, 404, e409="...")."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        model = ValidationErrorBody if code == 422 else ErrorBody
        out[code] = {
            "description": notes.get(f"e{code}", DESCRIPTIONS[code]),
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
    return out
