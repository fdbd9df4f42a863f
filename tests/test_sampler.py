"""The batched sampler on hand-made logits: no model needed."""

import math

import torch

from arborlm.runtime.sampling.params import SamplingParams
from arborlm.runtime.sampling.sampler import Sampler, SampleRow

V = 50


def row(gen=None, out=(), prompt=(1, 2), **params):
    p = SamplingParams.from_dict(params)
    return SampleRow(p, gen, list(prompt), list(out))


def test_greedy_and_top_k_1_take_the_argmax():
    logits = torch.randn(3, V)
    s = Sampler(V, {2})
    out = s(logits, [row(temperature=0), row(top_k=1), row(temperature=0)])
    assert out.next_ids == logits.argmax(-1).tolist()


def test_seed_reproduces_and_is_batch_independent():
    logits = torch.randn(4, V)
    s = Sampler(V, {2})
    a = [s(logits[:1], [row(torch.Generator().manual_seed(7))]).next_ids[0] for _ in range(1)]
    draws_alone = []
    g = torch.Generator().manual_seed(7)
    for _ in range(20):
        draws_alone.append(s(logits[:1], [row(g)]).next_ids[0])
    g = torch.Generator().manual_seed(7)
    draws_batched = []
    for _ in range(20):  # same request, now next to unseeded rows
        out = s(logits, [row(g), row(), row(temperature=0), row()])
        draws_batched.append(out.next_ids[0])
    assert draws_alone == draws_batched and draws_alone[0] == a[0]
    assert len(set(draws_alone)) > 1  # it really samples


def test_top_p_and_top_k_restrict_the_support():
    logits = torch.full((1, V), -10.0)
    logits[0, :4] = torch.tensor([5.0, 4.0, 3.0, 2.0])
    s = Sampler(V, set())
    seen_p = {s(logits, [row(top_p=0.8)]).next_ids[0] for _ in range(200)}
    probs = torch.softmax(logits[0], -1)
    assert probs[0] < 0.8 < probs[0] + probs[1]
    assert seen_p == {0, 1}  # the smallest set reaching 0.8
    seen_k = {s(logits, [row(top_k=3)]).next_ids[0] for _ in range(300)}
    assert seen_k == {0, 1, 2}
    seen_minp = {s(logits, [row(min_p=0.3)]).next_ids[0] for _ in range(200)}
    assert seen_minp == {0, 1}  # p(2)/p(0) = e^-2 < 0.3 < e^-1


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1] + [1e-9] * (V - 3)]))
    s = Sampler(V, set(), seed=1)
    n = 3000
    draws = torch.tensor([s(logits, [row()]).next_ids[0] for _ in range(n)])
    freq = torch.bincount(draws, minlength=3)[:3].float() / n
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.04)


def test_penalties_change_the_choice():
    logits = torch.zeros(1, V)
    logits[0, 5] = 1.0
    logits[0, 6] = 0.9
    s = Sampler(V, set())
    assert s(logits, [row(temperature=0, out=[5])]).next_ids == [5]
    assert s(logits, [row(temperature=0, out=[5], frequency_penalty=0.5)]).next_ids == [6]
    assert s(logits, [row(temperature=0, out=[5], presence_penalty=0.5)]).next_ids == [6]
    assert s(logits, [row(temperature=0, prompt=[5], repetition_penalty=1.5)]).next_ids == [6]
    # penalties apply only to their own row
    both = s(logits.repeat(2, 1), [row(temperature=0, out=[5], frequency_penalty=0.5), row(temperature=0, out=[5])])
    assert both.next_ids == [6, 5]


def test_min_new_tokens_masks_eos_and_stop_ids():
    logits = torch.zeros(1, V)
    logits[0, 2] = 10.0  # eos
    logits[0, 7] = 9.0
    logits[0, 8] = 8.0
    s = Sampler(V, {2})
    assert s(logits, [row(temperature=0, min_new_tokens=2, max_new_tokens=5)]).next_ids == [7]
    assert s(logits, [row(temperature=0, min_new_tokens=2, max_new_tokens=5, stop_token_ids=[7])]).next_ids == [8]
    assert s(logits, [row(temperature=0, out=[1, 1], min_new_tokens=2, max_new_tokens=5)]).next_ids == [2]


def test_logprobs_are_raw_model_logprobs():
    logits = torch.randn(2, V)
    s = Sampler(V, set())
    rows = [row(temperature=0), row(temperature=0)]
    rows[0].return_logprob, rows[0].top_logprobs_num = True, 3
    out = s(logits, rows)
    ref = torch.log_softmax(logits[0], -1)
    assert math.isclose(out.logprobs[0], ref.max().item(), rel_tol=1e-5)
    assert [t for _, t in out.top_logprobs[0]] == ref.topk(3).indices.tolist()
    assert out.logprobs[1] is None and out.top_logprobs[1] is None
