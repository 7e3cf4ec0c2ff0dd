"""The served OpenAPI document is valid for the version it declares (openapi-spec-validator), and a
client generated from it by a tool no one here wrote (openapi-python-client) calls embeddings and chat."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import httpx
from openapi_spec_validator.validation import OpenAPIV31SpecValidator

from tests.reference import reference
from tests.server import LONG
from tests.test_chat import MODEL, QUESTION

EMBEDDER = "all-minilm-l6-v2"


def test_the_document_is_valid_openapi_3_1(server: str) -> None:
    document = httpx.get(f"{server}/docs.json", timeout=LONG).json()
    assert document["openapi"] == "3.1.0"
    errors = [str(error).splitlines()[0] for error in OpenAPIV31SpecValidator(document).iter_errors()]
    assert errors == []
    operations = [op.get("operationId") for item in document["paths"].values() for op in item.values()]
    operations = [name for name in operations if name]
    assert len(operations) == len(set(operations))
    assert {"/v1/embeddings", "/v1/chat/completions", "/v1/completions", "/tokenize"} <= set(
        document["paths"]
    )


def test_a_client_generated_from_the_document_calls_embeddings_and_chat(server: str, tmp_path: Path) -> None:
    spec = tmp_path / "openapi.json"
    spec.write_text(httpx.get(f"{server}/docs.json", timeout=LONG).text)
    generator = Path(sys.executable).with_name("openapi-python-client")
    command = [str(generator), "generate", "--path", str(spec), "--meta", "none", "--output-path"]
    subprocess.run([*command, str(tmp_path / "fnserve_client")], check=True, capture_output=True, timeout=600)
    sys.path.insert(0, str(tmp_path))
    try:
        package = importlib.import_module("fnserve_client")
        api = importlib.import_module("fnserve_client.api.default")
        models = importlib.import_module("fnserve_client.models")
        embeddings = importlib.import_module(f"{api.__name__}.create_embeddings_v1_embeddings_post")
        chat = importlib.import_module(f"{api.__name__}.create_chat_completion_v1_chat_completions_post")
        client = package.Client(base_url=server, timeout=httpx.Timeout(LONG))

        vectors = embeddings.sync(
            client=client, body=models.EmbeddingRequest(input_=["a", "b"], model=EMBEDDER)
        )
        assert isinstance(vectors, models.EmbeddingResponse)
        assert [len(item.embedding) for item in vectors.data] == [384, 384]

        message = models.ChatMessageIn(role=models.ChatMessageInRole.USER, content=QUESTION)
        body = models.ChatCompletionRequest(model=MODEL, messages=[message], max_tokens=16, temperature=0)
        answer = chat.sync_detailed(client=client, body=body)
        assert answer.status_code == 200, answer.content
        content = json.loads(answer.content)["choices"][0]["message"]["content"]
        assert content == reference(QUESTION, 16)
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m.split(".")[0] == "fnserve_client"]:
            del sys.modules[name]
