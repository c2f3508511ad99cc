"""Seeded sampling draws per prompt: prompt i of a seeded call samples from its own generator,
seeded with `request_seed(seed, i)` (the vLLM engine's rule), so its completion is the same alone,
at any batch size and with other prompts after it; greedy decoding does not touch the seed."""

from __future__ import annotations

import pytest
import torch

from posttrain.rollout import engines
from posttrain.rollout.generate import generate_token_ids
from posttrain.rollout.sampling import SamplingSettings, request_seed, row_generators, sample_categorical

PROMPTS = [[1, 5, 9, 2, 40], [1, 7], [1, 4, 4, 4, 3, 8], [1, 9, 9]]


@pytest.fixture(scope="module")
def model():
    from posttrain.config import ModelConfig
    from posttrain.models.loading import load_model

    torch.manual_seed(0)
    return load_model(ModelConfig(path="tiny"))


def _generate(model, prompts, seed=3, batch_size=8, temperature=1.0, **kwargs):
    settings = SamplingSettings(max_new_tokens=8, temperature=temperature, seed=seed, **kwargs)
    return generate_token_ids(model, prompts, settings, pad_token_id=0, eos_token_ids=set(), batch_size=batch_size)


def test_a_prompts_sample_does_not_depend_on_batch_size(model):
    every = [_generate(model, PROMPTS, batch_size=size) for size in (1, 2, 3, 8)]
    assert all(out == every[0] for out in every[1:])


def test_a_prompts_sample_does_not_depend_on_the_prompts_after_it(model):
    """Prompt i's sample: alone (as index 0), first of a batch, and with longer prompts added after
    it, which reorder the longest-first batches."""
    full = _generate(model, PROMPTS)
    assert _generate(model, PROMPTS[:1])[0] == full[0]
    assert _generate(model, PROMPTS[:2]) == full[:2]
    assert _generate(model, PROMPTS + [[1, 2, 3, 4, 5, 6, 7, 8, 9], [6] * 12], batch_size=2)[:4] == full


def test_copies_of_a_prompt_differ_and_seeds_change_the_sample(model):
    copies = _generate(model, [PROMPTS[0]] * 4, top_k=50)
    assert len({tuple(c) for c in copies}) > 1
    assert _generate(model, PROMPTS, seed=3) != _generate(model, PROMPTS, seed=4)
    assert _generate(model, PROMPTS, seed=3) == _generate(model, PROMPTS, seed=3)


def test_row_i_draws_from_request_seed_of_i(model):
    """The uniforms of row i are those of a generator seeded with request_seed(seed, i), the seed
    the vLLM engine gives request i."""
    assert engines.request_seed is request_seed
    gens = row_generators(11, 3)
    mine = torch.cat([torch.rand(1, 1, dtype=torch.float64, generator=g) for g in gens])
    expected = torch.cat([torch.rand(1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(
        request_seed(11, i))) for i in range(3)])
    assert torch.equal(mine, expected)
    probs = torch.softmax(torch.randn(3, 700, generator=torch.Generator().manual_seed(0)), dim=-1)
    one_by_one = [sample_categorical(probs[i:i + 1], generator=[g]) for i, g in enumerate(row_generators(11, 3))]
    assert torch.equal(sample_categorical(probs, generator=row_generators(11, 3)), torch.cat(one_by_one))
    with pytest.raises(ValueError, match="2 generators for 3 rows"):
        sample_categorical(probs, generator=row_generators(11, 2))


def test_greedy_ignores_the_seed_and_the_batch(model):
    greedy = _generate(model, PROMPTS, seed=None, temperature=0.0)
    assert _generate(model, PROMPTS, seed=5, temperature=0.0) == greedy
    assert _generate(model, PROMPTS, seed=5, temperature=0.0, batch_size=1) == greedy
