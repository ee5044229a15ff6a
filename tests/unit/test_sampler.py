"""Sampler: filters, penalties, seeded draws that do not depend on the batch."""
import math

import torch

from llmesh.services.common.sampling_params import SamplingParams
from llmesh.services.executor.sampler import SampleRow, exponential_noise, row_key, sample


def _row(seed=1, position=10, prompt=(), output=(), **params):
    return SampleRow(SamplingParams(seed=seed, **params), 0, position, list(prompt) + list(output),
                     len(prompt))


def _draws(logits, n=400, **params):
    """Token ids drawn for n different positions."""
    rows = [_row(position=p, **params) for p in range(n)]
    return sample(logits.expand(n, -1).clone(), rows)[0]


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0], [5.0, 0.0, 0.0, 0.0]])
    assert sample(logits, [_row(), _row()])[0] == [1, 0]


def test_top_k_top_p_min_p_restrict_support():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.06, 0.04]]))
    assert set(_draws(logits, temperature=1.0, top_k=2)) == {0, 1}
    assert set(_draws(logits, temperature=1.0, top_p=0.65)) == {0, 1}  # 0.4 + 0.3 covers 0.65
    assert set(_draws(logits, temperature=1.0, top_p=0.3)) == {0}
    assert set(_draws(logits, temperature=1.0, min_p=0.45)) == {0, 1, 2}  # p >= 0.18
    assert set(_draws(logits, temperature=1.0)) == {0, 1, 2, 3, 4}


def test_draws_follow_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2])
    draws = _draws(torch.log(probs)[None], n=6000, temperature=1.0)
    freq = torch.bincount(torch.tensor(draws), minlength=3).float() / len(draws)
    assert torch.allclose(freq, probs, atol=0.03)
    # temperature sharpens
    sharp = _draws(torch.log(probs)[None], n=3000, temperature=0.3)
    assert sharp.count(0) / 3000 > 0.75


def test_seeded_draw_is_independent_of_batch():
    torch.manual_seed(0)
    logits = torch.randn(6, 500)
    rows = [_row(seed=s, position=3 + s, temperature=0.9, top_p=0.9) for s in range(6)]
    together = sample(logits, rows)[0]
    alone = [sample(logits[i:i + 1], [rows[i]])[0][0] for i in range(6)]
    reordered = sample(logits.flip(0), rows[::-1])[0][::-1]
    assert together == alone == reordered
    other_seed = sample(logits, [_row(seed=s + 100, position=3 + s, temperature=0.9) for s in range(6)])[0]
    assert other_seed != together


def test_noise_is_exponential_and_keyed():
    keys = torch.tensor([row_key(1, 0, 5), row_key(1, 0, 6), row_key(1, 1, 5)])
    noise = exponential_noise(keys, 20000)
    assert abs(noise.mean().item() - 1.0) < 0.03
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])
    assert torch.equal(noise[0], exponential_noise(keys[:1], 20000)[0])


def test_penalties():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    # repetition: positive logits divided, negative multiplied, for prompt and output tokens
    out = sample(logits, [_row(prompt=[0], output=[1], repetition_penalty=4.0, logprobs=0)])
    assert out[0] == [2]  # 2.0/4=0.5 < 1.0
    # frequency: subtract count * penalty; presence: subtract once
    assert sample(logits, [_row(output=[0, 0], frequency_penalty=0.6)])[0] == [2]  # 2 - 1.2 < 1
    assert sample(logits, [_row(output=[0, 0], frequency_penalty=0.4)])[0] == [0]  # 2 - 0.8 > 1
    assert sample(logits, [_row(output=[0, 0], presence_penalty=1.1)])[0] == [2]  # 2 - 1.1 < 1
    assert sample(logits, [_row(output=[0, 0], presence_penalty=0.9)])[0] == [0]


def test_logprobs_of_the_raw_distribution():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    _, lps = sample(logits, [_row(logprobs=2, temperature=0.5, seed=3)])
    lp = lps[0]
    expect = torch.log_softmax(logits[0], -1)
    assert lp.top_ids == [2, 1]
    assert math.isclose(lp.top_logprobs[0], expect[2].item(), rel_tol=1e-6)
    assert math.isclose(lp.logprob, expect[lp.token_id].item(), rel_tol=1e-6)


def test_vectorised_noise_keys_are_the_per_row_ones():
    import numpy as np
    from llmesh.services.executor.sampler import row_keys
    rng = np.random.default_rng(1)
    seeds = [0, 1, 2 ** 32 - 1, 2 ** 32, 2 ** 63 - 1] + rng.integers(0, 2 ** 63, 50).tolist()
    idx = [i % 5 for i in range(len(seeds))]
    pos = [0, 1, 2 ** 31, 2 ** 32 - 1] + rng.integers(0, 2 ** 20, len(seeds) - 4).tolist()
    got = row_keys(np.array(seeds, np.uint64), np.array(idx, np.uint64), np.array(pos, np.uint64))
    assert got.tolist() == [row_key(s, i, p) for s, i, p in zip(seeds, idx, pos)]


def test_a_batch_of_logprob_requests_comes_back_row_by_row():
    """Rows that want 0, 1 or 5 alternatives, and rows that want none, in one
    batch: each gets its own, as if it had been sampled alone."""
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    wants = [None, 0, 5, None, 1, 5]
    rows = [_row(seed=s, position=s, logprobs=k, temperature=0.8 if s % 2 else 0.0)
            for s, k in enumerate(wants)]
    tokens, lps = sample(logits.clone(), rows)
    for i, (k, lp) in enumerate(zip(wants, lps)):
        alone_tokens, alone = sample(logits[i:i + 1].clone(), [rows[i]])
        assert tokens[i] == alone_tokens[0]
        if k is None:
            assert lp is None
            continue
        expect = torch.log_softmax(logits[i], -1)
        assert lp.token_id == tokens[i] and lp == alone[0]
        assert lp.logprob == expect[tokens[i]].item()
        assert lp.top_ids == expect.topk(k).indices.tolist() if k else lp.top_ids == []
        assert len(lp.top_logprobs) == k
