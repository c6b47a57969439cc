"""Intra-engine batching: fifo token budget and the compute quota with binary-search chunking."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schedulers import PrefillWork, make_batcher
from schedulers.batching import largest_fitting_bsz
from schedulers.cost_model import CostModel, FitCoefficients

CM = CostModel("ds27b", "h800")


def work(i, cached, remaining):
    return PrefillWork(request_id=i, cached_tokens=cached, remaining_tokens=remaining)


def test_fifo_budget_and_chunking():
    b = make_batcher("fifo", token_budget=1000)
    out = b.form_batch([work(1, 0, 300), work(2, 5000, 900), work(3, 0, 10)])
    assert [(x.request_id, x.cached, x.bsz) for x in out] == [(1, 0, 300), (2, 5000, 700)]
    b = make_batcher("fifo", token_budget=1000, chunk=False)
    assert [x.request_id for x in b.form_batch([work(1, 0, 300), work(2, 0, 900)])] == [1]
    assert [x.bsz for x in b.form_batch([work(2, 0, 900 * 2)])] == [1000]  # a lone head is still chunked
    with pytest.raises(ValueError, match="token_budget"):
        make_batcher("fifo", token_budget=0)


def test_fifo_skips_finished_and_rejects_negative():
    b = make_batcher("fifo")
    assert [x.request_id for x in b.form_batch([work(1, 10, 0), work(2, 0, 5)])] == [2]
    with pytest.raises(ValueError, match="negative"):
        b.form_batch([work(1, 0, -1)])


def test_batcher_configs_that_would_stall_or_ignore_their_caps_are_rejected():
    """max_requests=0 / token_budget=0 formed an empty batch on every forward (no progress, ever); a NaN cap
    was no cap, a NaN quota cut every batch to one token, a fractional budget gave fractional bsz."""
    nan = float("nan")
    for kw in ({"max_requests": 0}, {"max_requests": -1}, {"token_budget": nan}, {"token_budget": 2.5}):
        with pytest.raises(ValueError, match=r"must be >= 1 \(an int\)"):
            make_batcher("fifo", **kw)
    for kw in ({"token_budget": 0}, {"token_budget": nan}, {"min_chunk_tokens": nan}):
        with pytest.raises(ValueError, match=r"must be >= 1 \(an int\)"):
            make_batcher("compute_quota", cost_model=CM, **kw)
    with pytest.raises(ValueError, match="quota_s must be > 0, got nan"):
        make_batcher("compute_quota", cost_model=CM, quota_s=nan)
    assert [x.bsz for x in make_batcher("fifo", max_requests=1).form_batch([work(1, 0, 5), work(2, 0, 5)])] == [5]


def test_compute_quota_rejects_negative_work_it_reaches():
    b = make_batcher("compute_quota")
    with pytest.raises(ValueError, match="negative"):
        b.form_batch([work(1, -5, 10)])
    with pytest.raises(ValueError, match="negative"):
        b.form_batch([work(1, 0, 0), work(2, 0, -1)])
    assert [x.request_id for x in b.form_batch([work(1, 0, 0), work(2, 0, 5)])] == [2]


@pytest.mark.parametrize("name", ["fifo", "compute_quota"])
def test_batchers_reject_nan_and_infinite_work(name):
    """NaN or inf token counts passed the `< 0` checks: fifo formed items of bsz NaN or cached inf, compute_quota
    a one-token chunk on a NaN/inf cache or a bare "cannot convert float NaN/infinity to integer"."""
    nan, inf = float("nan"), float("inf")
    b = make_batcher(name, cost_model=CM) if name == "compute_quota" else make_batcher(name)
    for cached, remaining in ((0, nan), (nan, 10), (0, inf), (inf, 10)):
        with pytest.raises(ValueError, match="prefill work 2: negative, NaN or infinite tokens"):
            b.form_batch([work(1, 0, 0), work(2, cached, remaining)])
    assert [(x.request_id, x.bsz) for x in b.form_batch([work(1, 7, 0), work(2, 0, 5)])] == [(2, 5)]


def test_compute_quota_cost_model_must_have_attention_time():
    """A model name given as cost_model (a command line's string) was an AttributeError at the first batch."""
    with pytest.raises(TypeError, match="cost_model must be a CostModel .*got str 'ds27b'"):
        make_batcher("compute_quota", cost_model="ds27b")
    assert make_batcher("compute_quota", cost_model=CM).cost_model is CM


def test_largest_fitting_bsz_matches_brute_force():
    for cached in (0, 100, 5000, 60_000):

        def cost(b, cached=cached):
            return CM.attention_time(cached, b)

        for budget in (1e-6, 1e-3, 0.05, 0.3):
            got = largest_fitting_bsz(cost, budget, 3000)
            brute = max([b for b in range(3001) if b == 0 or cost(b) <= budget])
            assert got == brute, (cached, budget)


def test_compute_quota_packs_then_chunks_overflow():
    quota = 0.05
    b = make_batcher("compute_quota", quota_s=quota, cost_model=CM)
    queue = [work(1, 30_000, 400), work(2, 60_000, 8_000), work(3, 0, 100)]
    out = b.form_batch(queue)
    assert [x.request_id for x in out] == [1, 2]
    assert out[0].bsz == 400  # fits whole
    used = CM.attention_time(30_000, 400)
    assert used < quota
    # the overflowing request gets the largest bsz that fits the quota left
    chunk = out[1].bsz
    assert 0 < chunk < 8_000
    assert used + CM.attention_time(60_000, chunk) <= quota + 1e-12
    assert used + CM.attention_time(60_000, chunk + 1) > quota
    assert b.predicted_attention_time(out) <= quota + 1e-12


def test_compute_quota_default_is_300ms_and_progress():
    b = make_batcher("compute_quota", cost_model=CM)
    assert b.config.quota_s == 0.3
    # a head request whose single token exceeds a tiny quota still progresses by min_chunk_tokens
    tiny = make_batcher("compute_quota", quota_s=1e-9, cost_model=CM, min_chunk_tokens=16)
    out = tiny.form_batch([work(1, 100_000, 500), work(2, 0, 10)])
    assert [(x.request_id, x.bsz) for x in out] == [(1, 16)]


def test_compute_quota_token_budget_cap():
    b = make_batcher("compute_quota", quota_s=10.0, cost_model=CM, token_budget=500)
    out = b.form_batch([work(1, 0, 300), work(2, 0, 300), work(3, 0, 300)])
    assert [(x.request_id, x.bsz) for x in out] == [(1, 300), (2, 200)]


def test_compute_quota_builds_cost_model_from_names():
    b = make_batcher("compute_quota", model="qwen2.5-32b", hardware="h200")
    assert b.cost_model.model.name == "qwen2.5-32b" and b.cost_model.hw.name == "h200"


@settings(max_examples=80, deadline=None)
@given(
    items=st.lists(st.tuples(st.integers(0, 120_000), st.integers(0, 20_000)), max_size=12),
    quota=st.floats(1e-4, 1.0),
)
def test_compute_quota_properties(items, quota):
    queue = [work(i, c, r) for i, (c, r) in enumerate(items)]
    out = make_batcher("compute_quota", quota_s=quota, cost_model=CM).form_batch(queue)
    live = [w for w in queue if w.remaining_tokens > 0]
    # FIFO prefix of the live queue, each at most its remaining tokens, only the last may be partial
    assert [x.request_id for x in out] == [w.request_id for w in live[: len(out)]]
    for x, w in zip(out, live, strict=False):
        assert x.cached == w.cached_tokens and 0 < x.bsz <= w.remaining_tokens
    assert all(x.bsz == w.remaining_tokens for x, w in zip(out[:-1], live, strict=False))
    total = sum(CM.attention_time(x.cached, x.bsz) for x in out)
    assert total <= quota + 1e-12 or (len(out) == 1 and out[0].bsz == 1)
    if live:
        assert out, "the batch must make progress"
    if out and len(out) < len(live) and out[-1].bsz == live[len(out) - 1].remaining_tokens:
        nxt = live[len(out)]  # the next request did not fit even one token
        assert total + CM.attention_time(nxt.cached_tokens, 1) > quota


@settings(max_examples=80, deadline=None)
@given(
    items=st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 3000)), max_size=12),
    budget=st.integers(1, 5000),
)
def test_fifo_properties(items, budget):
    queue = [work(i, c, r) for i, (c, r) in enumerate(items)]
    out = make_batcher("fifo", token_budget=budget).form_batch(queue)
    live = [w for w in queue if w.remaining_tokens > 0]
    assert [x.request_id for x in out] == [w.request_id for w in live[: len(out)]]
    assert sum(x.bsz for x in out) <= budget
    assert sum(x.bsz for x in out) == min(budget, sum(w.remaining_tokens for w in live))


def _reference_compute_quota(queue, quota, cm, token_budget=None, min_chunk_tokens=1):
    """compute_quota's batch as first written (a closure per binary search, attention times recomputed)."""
    used = 0.0
    tokens_left = token_budget if token_budget is not None else float("inf")
    out = []
    for w in queue:
        if w.remaining_tokens == 0:
            continue
        upper = int(min(w.remaining_tokens, tokens_left))
        if upper <= 0:
            break
        t_full = cm.attention_time(w.cached_tokens, upper)
        if used + t_full <= quota:
            take = upper
        else:
            # (max: the head's min_chunk_tokens may have used more than the quota; the budget then is 0, not < 0)
            take = largest_fitting_bsz(
                lambda b, c=w.cached_tokens: cm.attention_time(c, b), max(0.0, quota - used), upper
            )
            if not out:
                take = max(take, min(min_chunk_tokens, upper))
        if take == 0:
            break
        out.append((w.request_id, w.cached_tokens, take))
        used += cm.attention_time(w.cached_tokens, take)
        tokens_left -= take
        if take < w.remaining_tokens:
            break
    return out


_FITTED = CostModel("ds660b", "h800", ep=16, prefill_fit=FitCoefficients(0.004, 1.1e-15, 3.3e-15, 2.0e-13))


@settings(max_examples=150, deadline=None)
@given(
    items=st.lists(st.tuples(st.integers(0, 120_000), st.integers(0, 20_000)), max_size=14),
    quota=st.floats(1e-5, 2.0),
    token_budget=st.one_of(st.none(), st.integers(1, 30_000)),
    min_chunk=st.integers(1, 64),
    which=st.sampled_from(["ds27b", "ds660b-ep16", "fitted"]),
)
def test_compute_quota_same_batches_as_reference(items, quota, token_budget, min_chunk, which):
    """The faster batch forming (no closure, reused attention times) takes exactly the same items."""
    cm = {"ds27b": CM, "ds660b-ep16": CostModel("ds660b", "h800", ep=16), "fitted": _FITTED}[which]
    queue = [work(i, c, r) for i, (c, r) in enumerate(items)]
    b = make_batcher(
        "compute_quota", quota_s=quota, cost_model=cm, token_budget=token_budget, min_chunk_tokens=min_chunk
    )
    got = [(x.request_id, x.cached, x.bsz) for x in b.form_batch(queue)]
    assert got == _reference_compute_quota(queue, quota, cm, token_budget, min_chunk)
