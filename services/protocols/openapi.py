"""The OpenAPI document BentoML serves at /docs.json, made valid for the version it declares.

BentoML 1.4.40 merges FastAPI's schemas into a document it labels OpenAPI 3.0.2. FastAPI's schemas are
3.1 (JSON Schema 2020-12: `anyOf` with `type: null`, a numeric `exclusiveMinimum`), so a tool that
reads the label fails: schemathesis generated no case for `/v1/embeddings` or the chat routes ("Schema
Error"). fnserve serves the document as 3.1.0 and mends the two parts of BentoML's own that are not
valid 3.1:
- a file input typed `file`, which is no JSON Schema type: it becomes a binary string;
- the task routes' `cancel` operation, which reuses `retry`'s operationId: each repeat is renamed from
  its path.

The patch wraps the one method that serves the document (`ServiceAppFactory.openapi_spec_view`, BentoML
pinned at 1.4.40). `tests/test_openapi.py` validates what is served with openapi-spec-validator, so it
fails if BentoML changes either."""

from __future__ import annotations

import json
from typing import Any

VERSION = "3.1.0"


def mended(document: dict[str, Any]) -> dict[str, Any]:
    """The document as OpenAPI 3.1.0, with BentoML's invalid parts replaced."""
    document = {**document, "openapi": VERSION}
    seen: set[str] = set()
    for path, item in document.get("paths", {}).items():
        for operation in item.values():
            if not isinstance(operation, dict) or "operationId" not in operation:
                continue
            if operation["operationId"] in seen:
                prefix = operation["operationId"].split("__")[0]
                operation["operationId"] = f"{prefix}__{path.strip('/').replace('/', '_')}"
            seen.add(operation["operationId"])
    return binary_files(document)


def binary_files(node: Any) -> Any:
    if isinstance(node, dict):
        if node.get("type") == "file":
            node = {**node, "type": "string", "format": "binary"}
        return {key: binary_files(value) for key, value in node.items()}
    if isinstance(node, list):
        return [binary_files(value) for value in node]
    return node


def install() -> None:
    """Serves the mended document at /docs.json; idempotent."""
    from _bentoml_impl.server.app import ServiceAppFactory
    from starlette.responses import JSONResponse, Response

    library = ServiceAppFactory.openapi_spec_view
    if getattr(library, "mended", False):
        return

    async def openapi_spec_view(self: ServiceAppFactory, request: Any) -> Response:
        served = await library(self, request)
        if served.status_code != 200:
            return served
        return JSONResponse(mended(json.loads(served.body)))

    openapi_spec_view.mended = True  # type: ignore[attr-defined]
    ServiceAppFactory.openapi_spec_view = openapi_spec_view  # type: ignore[method-assign]
