"""JSON null for an optional field, read as "not given", one rule for the protocols whose clients send it:
OpenAI documents its optional fields as "... or null" (vLLM takes them so), and KServe's data model
types the optional parts of a v2 request as Optional."""

from __future__ import annotations

from pydantic import BaseModel


def without_nulls(model: type[BaseModel], data: object) -> object:
    """`data` (a request body about to be validated as `model`) without its optional fields that are
    null, so that they get their defaults; a required field that is null is left to be refused."""
    if not isinstance(data, dict):
        return data
    optional = {name for name, field in model.model_fields.items() if not field.is_required()}
    return {key: value for key, value in data.items() if value is not None or key not in optional}
