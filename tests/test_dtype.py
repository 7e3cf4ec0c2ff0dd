"""bf16, which `auto` serves where the CPU computes it fast, must give the same vectors as fp32 up to a stated
bound."""

from __future__ import annotations

import bentoml
import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from models.catalog import CATALOG
from services.functions.embedding import TextEncoder

MAX_COSINE_DISTANCE = 1e-3  # stated in the README


def test_bf16_vectors_stay_within_the_stated_distance_of_fp32() -> None:
    path = bentoml.models.get(CATALOG["all-minilm-l6-v2"].tag).path
    encoder = TextEncoder(AutoTokenizer.from_pretrained(path), 256)
    texts = [f"Sentence {i}: serving many small requests efficiently needs batching." for i in range(32)]
    texts += ["short", "A much longer input that keeps going " * 20]
    vectors = {
        dtype: encoder.encode(AutoModel.from_pretrained(path, dtype=dtype).eval(), texts)[0]
        for dtype in (torch.float32, torch.bfloat16)
    }
    cosine = np.sum(vectors[torch.float32] * vectors[torch.bfloat16], axis=1)
    assert 1 - cosine.min() < MAX_COSINE_DISTANCE, 1 - cosine.min()
