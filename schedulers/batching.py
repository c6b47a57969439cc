"""Intra-engine batching: which queued prefill work one PE forward takes (no jax).

A PE's local queue is FIFO; a batch item is (cached, bsz): prefill `bsz` tokens on top of `cached`.
  - `fifo`: take requests in order while the batch's new tokens stay within `token_budget`; the request
    that would overflow is chunked to the tokens left (chunked prefill).
  - `compute_quota` (PAPER.md "Intra-engine"): take requests in order while the predicted attention time
    (cost model, FLOPs of (cached, bsz) mapped to seconds) stays within `quota_s` (300 ms); the request
    that would overflow is chunk-prefilled with the largest bsz that fits (binary search: attention time
    is monotone in bsz). This keeps data-parallel ranks' attention times equal.
Both always make progress: an empty batch's head request gets tokens even when it does not fit (`fifo`: up to
`token_budget`, chunked even with `chunk=False`; `compute_quota`: at least `min_chunk_tokens`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from schedulers.api import BatchItem, IntraEnginePolicy, PrefillWork
from schedulers.cost_model import CostModel
from schedulers.registry import BATCHERS, describe, is_bool, is_int, is_real

_INF = float("inf")


def largest_fitting_bsz(cost: Callable[[int], float], budget: float, upper: int) -> int:
    """Largest b in [0, upper] with cost(b) <= budget, for `cost` non-decreasing in b (binary search)."""
    # a NaN budget gave 1 (no comparison holds: the search kept its lower end), an inf one `upper` at any cost
    if not is_real(budget) or not 0 <= budget < _INF:
        raise ValueError(f"largest_fitting_bsz budget must be a finite number >= 0, got {budget!r}")
    if not is_int(upper) or upper < 0:  # 2.5 searched fractional midpoints, True was 1
        raise ValueError(f"largest_fitting_bsz upper must be an int >= 0, got {upper!r}")
    if upper <= 0 or cost(1) > budget:
        return 0
    if cost(upper) <= budget:
        return upper
    lo, hi = 1, upper  # cost(lo) <= budget < cost(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cost(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def _largest_fitting_chunk(
    attention_time: Callable[[int, int], float], cached: int, budget: float, upper: int, t_upper: float
) -> int:
    """`largest_fitting_bsz` of b -> attention_time(cached, b), given t_upper = attention_time(cached, upper):
    the same search (same evaluations), without a closure per call."""
    if upper <= 0 or attention_time(cached, 1) > budget:
        return 0
    if t_upper <= budget:
        return upper
    lo, hi = 1, upper
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if attention_time(cached, mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def _is_count(x) -> bool:
    """An int >= 1 (a batch's token or request cap: NaN, fractions, bools and 0 are configuration mistakes)."""
    return is_int(x) and x >= 1


def _check_work(w: PrefillWork) -> None:
    """Checked as a batcher reaches each request (batchers read a FIFO prefix, not the whole queue): the callers run
    it for work outside 0 < remaining < inf, 0 <= cached < inf, so it passes only finished work (remaining 0)."""
    if not (0 <= w.remaining_tokens < _INF and 0 <= w.cached_tokens < _INF):  # NaN too
        raise ValueError(
            f"prefill work {w.request_id}: negative, NaN or infinite tokens (cached={w.cached_tokens}, "
            f"remaining={w.remaining_tokens})"
        )


def _check_new(w: PrefillWork, seen: set[int]) -> None:
    """A request the batcher reaches twice in one call (it took two batch items of one request: its tokens prefilled
    twice); the policies refuse a request_id twice the same way. Only the FIFO prefix a batcher reads is checked."""
    rid = w.request_id
    if rid in seen:
        raise ValueError(f"prefill queue holds the same request_id twice ({rid})")
    seen.add(rid)


@BATCHERS.register("fifo")
class FifoBatcher(IntraEnginePolicy):
    """FIFO with a token budget per forward; the overflowing request is chunked to what is left."""

    name = "fifo"

    @dataclasses.dataclass(frozen=True)
    class Config:
        token_budget: int = 8192  # new (miss) tokens per forward
        max_requests: int | None = None  # cap on the batch's request count (None: no cap)
        # False: a request that does not fit waits for the next forward (the head of an empty batch is still chunked)
        chunk: bool = True

        def __post_init__(self):
            if not _is_count(self.token_budget):
                raise ValueError(f"fifo token_budget must be >= 1 (an int), got {describe(self.token_budget)}")
            if self.max_requests is not None and not _is_count(self.max_requests):  # 0: no batch would ever form
                raise ValueError(f"fifo max_requests must be >= 1 (an int) or None, got {describe(self.max_requests)}")
            if not is_bool(self.chunk):  # a string such as 'no' is truthy: chunking would stay on
                raise ValueError(f"fifo chunk must be a bool (True or False), got {describe(self.chunk)}")

    def __init__(self, config: FifoBatcher.Config | None = None):
        self.config = config or self.Config()

    def form_batch(self, queue: Sequence[PrefillWork]) -> list[BatchItem]:
        left = self.config.token_budget
        out: list[BatchItem] = []
        seen: set[int] = set()
        for w in queue:
            if self.config.max_requests is not None and len(out) >= self.config.max_requests:
                break
            _check_new(w, seen)
            if not (0 < w.remaining_tokens < _INF and 0 <= w.cached_tokens < _INF):
                _check_work(w)
                continue  # finished (remaining 0): anything else was refused
            take = min(w.remaining_tokens, left)
            if take < w.remaining_tokens and not self.config.chunk and out:
                break
            out.append(BatchItem(w.request_id, w.cached_tokens, take))
            left -= take
            if left == 0:
                break
        return out


@BATCHERS.register("compute_quota")
class ComputeQuotaBatcher(IntraEnginePolicy):
    """FIFO while predicted attention time stays within a quota; the overflowing request is chunked."""

    name = "compute_quota"

    @dataclasses.dataclass(frozen=True)
    class Config:
        quota_s: float = 0.3  # attention-time quota per forward (PAPER.md: 300 ms)
        cost_model: CostModel | None = None  # maps (cached, bsz) to attention seconds
        model: str = "ds27b"  # used when cost_model is None
        hardware: str = "h800"
        token_budget: int | None = None  # optional extra cap on new tokens per forward
        min_chunk_tokens: int = 1  # progress guarantee for a head request that alone exceeds the quota

        def __post_init__(self):
            # NaN too (it would cut every batch to one token); inf was no quota at all (PAPER.md: 300 ms)
            if not (is_real(self.quota_s) and 0 < self.quota_s < _INF):
                raise ValueError(f"compute_quota quota_s must be > 0, got {self.quota_s!r} (a finite time in seconds)")
            if self.token_budget is not None and not _is_count(self.token_budget):  # 0: no batch would ever form
                raise ValueError(
                    f"compute_quota token_budget must be >= 1 (an int) or None, got {describe(self.token_budget)}"
                )
            if not _is_count(self.min_chunk_tokens):
                raise ValueError(
                    f"compute_quota min_chunk_tokens must be >= 1 (an int), got {describe(self.min_chunk_tokens)}"
                )
            if self.cost_model is not None and not callable(getattr(self.cost_model, "attention_time", None)):
                # e.g. a model name from a command line: was an AttributeError at the first batch
                raise TypeError(
                    f"compute_quota cost_model must be a CostModel (with attention_time(cached, bsz)), got "
                    f"{type(self.cost_model).__name__} {self.cost_model!r}; name a registered one with model=/hardware="
                )

    def __init__(self, config: ComputeQuotaBatcher.Config | None = None):
        self.config = config or self.Config()
        c = self.config
        self.cost_model = c.cost_model if c.cost_model is not None else CostModel(c.model, c.hardware)

    def form_batch(self, queue: Sequence[PrefillWork]) -> list[BatchItem]:
        c = self.config
        quota = c.quota_s
        used = 0.0
        tokens_left = c.token_budget if c.token_budget is not None else float("inf")
        out: list[BatchItem] = []
        attention_time = self.cost_model.attention_time
        seen: set[int] = set()
        for w in queue:
            _check_new(w, seen)
            remaining = w.remaining_tokens
            if not (0 < remaining < _INF and 0 <= w.cached_tokens < _INF):
                _check_work(w)
                continue  # finished (remaining 0): anything else was refused
            upper = int(min(remaining, tokens_left))
            if upper <= 0:
                break
            cached = w.cached_tokens
            t = attention_time(cached, upper)
            if used + t <= quota:
                take = upper
            else:
                take = _largest_fitting_chunk(attention_time, cached, quota - used, upper, t)
                if not out:
                    take = max(take, min(c.min_chunk_tokens, upper))
                if take == 0:
                    break
                if take != upper:
                    t = attention_time(cached, take)
            out.append(BatchItem(w.request_id, cached, take))
            used += t
            tokens_left -= take
            if take < remaining:
                break  # the overflowing request was chunked: the batch is full
        return out

    def predicted_attention_time(self, batch: Sequence[BatchItem]) -> float:
        """Sum of predicted attention seconds of a batch (what the quota bounds)."""
        return sum(self.cost_model.attention_time(b.cached, b.bsz) for b in batch)
