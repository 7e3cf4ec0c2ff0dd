"""Request bodies as the protocols' clients send them: unknown keys refused (a typo gets a 400 that names
it), and JSON null for an optional field read as "not given". OpenAI documents its optional fields as
"... or null" (vLLM takes them so), and KServe's client and data model leave the optional parts of a v2
request null."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, model_validator


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def null_is_not_given(cls, data: object) -> object:
        """Optional fields sent as null get their defaults; a required one sent as null is refused."""
        if not isinstance(data, dict):
            return data
        optional = {name for name, field in cls.model_fields.items() if not field.is_required()}
        return {key: value for key, value in data.items() if value is not None or key not in optional}
