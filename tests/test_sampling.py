"""The engine's sampler draws tokens with the probabilities the logits give, and never an excluded one."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers.generation.continuous_batching.model_runner import ModelRunner

from services.functions.engine import sample_by_inverse_cdf


def draw(probs: list[float], rows: int, processing: bool = True) -> torch.Tensor:
    """`processing` off: no running request samples (GreedyBatches), so the engine takes the argmax."""
    sample_by_inverse_cdf()
    scores = torch.tensor(probs).log().expand(1, rows, len(probs)).contiguous()  # log 0 = -inf: excluded
    output_ids = torch.full((1, rows), -1, dtype=torch.int32)
    processors = SimpleNamespace(do_processing=processing)
    runner = SimpleNamespace(do_sample=True, return_logprobs=False, logit_processor=processors)
    ModelRunner._sample(runner, scores, output_ids)
    return output_ids[0]


def test_frequencies_follow_the_distribution() -> None:
    torch.manual_seed(0)
    probs = [0.5, 0.0, 0.3, 0.2, 0.0]
    tokens = draw(probs, rows=40_000)
    frequencies = torch.bincount(tokens, minlength=len(probs)).float() / tokens.numel()
    assert torch.allclose(frequencies, torch.tensor(probs), atol=0.01), frequencies
    assert frequencies[1] == 0 and frequencies[4] == 0


def test_a_one_hot_row_always_gives_its_token() -> None:
    assert set(draw([0.0, 0.0, 1.0, 0.0], rows=1000).tolist()) == {2}


def test_an_all_greedy_batch_takes_the_most_likely_token() -> None:
    assert set(draw([0.2, 0.1, 0.4, 0.3], rows=1000, processing=False).tolist()) == {2}


def test_a_row_without_a_distribution_takes_its_argmax() -> None:
    """NaN logits (a broken forward) give no distribution to draw from: the best finite logit wins."""
    assert set(draw([float("nan"), 0.2, 0.5, 0.3], rows=10).tolist()) == {2}
