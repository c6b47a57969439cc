"""Workload types shared by the simulator, the runtime and the trace loaders (no jax).

A trajectory (agent) is a sequence of turns. Turn i's prompt is A_1, G_1, ..., A_{i-1}, G_{i-1}, A_i
(PAPER.md "Workloads"); its KV of the earlier part is a hit (loaded from storage, whole blocks only; the stored KV
lacks G_{i-1}'s last token, which no engine computes, and a hit leaves one prompt token: `stored_hit`), the rest is
the miss (computed by prefill).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

import numpy as np

from dualpath_jax.checks import is_bool, is_int, is_real

_BOOLS = (bool, np.bool_)  # what `checks.is_bool` takes for a bool


def check_block_size(block_size) -> None:
    """A hit is whole blocks of `block_size` tokens: an int >= 1 (numpy ints too; the rule of `block_keys`' check).
    64.5 counted half tokens as hits, True 1-token blocks, 0 a ZeroDivisionError, -64 a negative miss."""
    if not is_int(block_size) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")


def stored_kv_tokens(prompt: int, gen: int) -> int:
    """Tokens of KV a turn of `prompt` + `gen` tokens leaves stored: all but its last generated token's, whose KV no
    engine computes (the runtime's `driver.slot_tokens`: each decode step writes the KV of the token before the one
    it makes; the next turn's prefill computes it). A turn generating nothing (a trace's prefill-only request) stores
    its whole prompt."""
    return prompt + gen - 1 if gen > 0 else prompt


def stored_hit(context: int, before: int, gen_before: int, prompt: int, block_size: int) -> int:
    """Hit of a turn of `prompt` tokens re-reading `context` tokens after a turn of `before` tokens (prompt +
    generation) that generated `gen_before`: the whole blocks of that context's stored KV (`stored_kv_tokens` where
    it re-reads the whole earlier turn), leaving at least one prompt token to prefill (the runtime's lookup,
    `scheduler_service`: the last prompt token is computed to give the logits). A context that is not the earlier
    turn's (a trace's re-read prefix: blocks of earlier prompts) is stored whole."""
    kv = stored_kv_tokens(before - gen_before, gen_before) if context == before else context
    kv = min(kv, prompt - 1)
    return (kv // block_size) * block_size if kv > 0 else 0


def _hash_ids(hashes) -> np.ndarray:
    """A turn's block hashes as the 1-D int64 array the hit counts read (`Turn.stored_prefix_tokens`): a list of ints
    (a trace of one's own) failed as "'list' object has no attribute 'tolist'" in the simulator's shared-prefix hits or
    `stats.shared_hit_rate`, and float, bool, 2-D or string hashes were kept (1.5 and 1.0 are no block ids)."""
    try:
        ids = np.asarray(hashes)
    except (TypeError, ValueError) as e:  # (a ragged list)
        raise ValueError(f"turn block_hashes must be a 1-D sequence of integer ids, got {e}") from None
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(
            f"turn block_hashes must be a 1-D sequence of integer ids (int64), got {ids.dtype} of shape {ids.shape}"
        )
    if ids.size and ids.dtype == np.uint64 and ids.max() > np.iinfo(np.int64).max:
        raise ValueError(f"turn block_hashes hold an id past the int64 range: {ids.max()}")
    return ids.astype(np.int64)


@dataclasses.dataclass(frozen=True, slots=True)
class Turn:
    append_tokens: int  # A_i: new prompt tokens of this turn (tool output, user text)
    gen_tokens: int  # G_i: tokens generated (forced to exactly this many)
    gap_s: float = 0.0  # think/tool time after this turn's generation before the next turn arrives
    # Optional real content: the appended token ids (runtime runs use them; len == append_tokens).
    append_token_ids: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
    # Optional, set by real-trace loaders (None/0 for synthetic workloads):
    # the earlier-context tokens this turn re-reads, when a trace states it (None: the previous turn's prompt +
    # generation, A_1 G_1 ... A_{i-1} G_{i-1} when no earlier turn states one).
    # Real agents drop or rewrite earlier text (e.g. thinking), so prompts do not always grow by append+gen.
    context_tokens: int | None = None
    # seconds after the trajectory's arrival_time at which the trace issued this turn (trace-timestamp mode)
    arrival_offset_s: float | None = None
    # prefix-chained ids of the prompt's blocks of `hash_block_size` tokens (equal id = equal prefix)
    block_hashes: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
    hash_block_size: int = 0

    def __post_init__(self):
        b = _BOOLS  # True passed `0 <= x < inf` and `% 1`: a 1-token turn
        if (
            isinstance(self.append_tokens, b)
            or isinstance(self.gen_tokens, b)
            or isinstance(self.context_tokens, b)
            or isinstance(self.hash_block_size, b)
        ):
            field = next(f for f in ("append_tokens", "gen_tokens", "context_tokens", "hash_block_size")
                         if is_bool(getattr(self, f)))  # fmt: skip
            raise ValueError(f"turn {field} must be a token count, not a bool: got {getattr(self, field)!r}")
        # times too: gap_s=True was a 1 s gap; and a str (a config's "0.5") was a TypeError naming no field
        for field in ("append_tokens", "gen_tokens", "gap_s", "context_tokens", "arrival_offset_s", "hash_block_size"):
            v = getattr(self, field)
            if v is not None and not is_real(v):
                raise ValueError(f"turn {field} must be a number, got {v!r} ({type(v).__name__})")
        # NaN too (e.g. a missing value of a table): it was kept, and peak_turn / cut_at_tokens skipped its turn
        if not (0 <= self.append_tokens < math.inf and 0 <= self.gen_tokens < math.inf):
            raise ValueError(
                f"turn lengths must be >= 0 and finite, got append={self.append_tokens} gen={self.gen_tokens}"
            )
        if self.append_tokens % 1 or self.gen_tokens % 1:  # half a token: fractional prompts, hits and KV sizes
            raise ValueError(
                f"turn lengths must be whole numbers, got append={self.append_tokens} gen={self.gen_tokens}"
            )
        if not 0 <= self.gap_s < math.inf:  # nan too; inf: the next turn "arrived" at t = inf and never ran
            raise ValueError(f"turn gap must be >= 0 s and finite, got {self.gap_s}")
        if self.append_token_ids is not None and len(self.append_token_ids) != self.append_tokens:
            raise ValueError(
                f"append_token_ids has {len(self.append_token_ids)} ids but append_tokens={self.append_tokens}"
            )
        if self.append_token_ids is not None:  # float ids (1.5) or a 2-D array were kept until block keys failed
            ids = np.asarray(self.append_token_ids)
            if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
                raise ValueError(
                    f"append_token_ids must be 1-D integer token ids, got {ids.dtype} of shape {ids.shape}"
                )
            if ids.size and ids.min() < 0:
                raise ValueError(f"append_token_ids must be >= 0, got {ids.min()}")
        if self.context_tokens is not None and not 0 <= self.context_tokens < math.inf:  # NaN too
            raise ValueError(f"context_tokens must be >= 0 and finite, got {self.context_tokens}")
        if self.context_tokens is not None and self.context_tokens % 1:
            raise ValueError(f"context_tokens must be a whole number, got {self.context_tokens}")
        if self.arrival_offset_s is not None and not 0 <= self.arrival_offset_s < math.inf:
            raise ValueError(f"arrival_offset_s must be >= 0 and finite, got {self.arrival_offset_s}")
        if self.block_hashes is not None and self.hash_block_size <= 0:
            raise ValueError("block_hashes needs hash_block_size > 0")
        if not is_int(self.hash_block_size) or self.hash_block_size < 0:  # -3 or 64.5 was kept without block_hashes
            raise ValueError(f"hash_block_size must be an int >= 0 (0: no block hashes), got {self.hash_block_size!r}")
        h = self.block_hashes
        if h is not None and not (type(h) is np.ndarray and h.dtype == np.int64 and h.ndim == 1):  # (the loaders')
            object.__setattr__(self, "block_hashes", _hash_ids(h))

    # Prefix hits across trajectories (the simulator's `workload.shared_prefix_hits`, `stats.shared_hit_rate`): one
    # store shared by every trajectory holds the hash blocks of the prompts prefilled before this turn.
    def stored_prefix_tokens(self, stored, prompt: int, block_size: int) -> int:
        """Tokens of this turn's prompt (`prompt` long) that a store holding the hash blocks `stored` serves: the run
        of its leading `block_hashes` found there, in whole `block_size` blocks, leaving at least one token to
        prefill; 0 without hashes."""
        if self.block_hashes is None:
            return 0
        n = 0
        for h in self.block_hashes.tolist():
            if h not in stored:
                break
            n += 1
        return (min(n * self.hash_block_size, prompt - 1) // block_size) * block_size

    def prompt_block_hashes(self, prompt: int) -> list:
        """The hashes of the whole hash blocks of this turn's prompt (`prompt` long), what its prefill stores; none
        without hashes."""
        if self.block_hashes is None:
            return []
        return self.block_hashes[: prompt // self.hash_block_size].tolist()


@dataclasses.dataclass
class Trajectory:
    trajectory_id: int
    turns: Sequence[Turn]
    arrival_time: float = 0.0  # when the agent's first turn arrives (online / trace modes)
    source: str = ""  # where it came from (generator name, trace file)

    def __setattr__(self, name, value):
        # arrival_time checked whenever it is set (__init__ and dataclasses.replace set it here too): NaN, inf or a
        # negative time was kept until the simulator refused it (the runtime driver has no such check), also when
        # assigned after construction; True was a 1 s arrival, a str (a config's "0.5") a TypeError naming no field.
        # (Reads stay plain attribute reads: the simulator reads the fields in its loops.)
        if name == "arrival_time" and (not is_real(value) or not 0 <= value < math.inf):
            raise ValueError(
                f"trajectory {getattr(self, 'trajectory_id', '?')} arrival_time must be a finite number of seconds "
                f">= 0, got {value!r}"
            )
        object.__setattr__(self, name, value)

    def context_before(self, i: int) -> int:
        """Tokens of A_1 G_1 ... A_{i-1} G_{i-1}: everything turn i re-reads (turn i-1's prompt + generation).

        A turn loaded from a real trace may state its re-read context (`Turn.context_tokens`); then that. An
        earlier turn's stated context counts too (as in `turn_shapes`): text it dropped does not come back.
        """
        if i < len(self.turns) and self.turns[i].context_tokens is not None:
            return self.turns[i].context_tokens
        ctx = 0
        for total in itertools.islice(self._turn_totals(), i):
            ctx = total
        return ctx

    def prompt_tokens(self, i: int) -> int:
        return self.context_before(i) + self.turns[i].append_tokens

    def hit_tokens(self, i: int, block_size: int) -> int:
        """Cached prefix of turn i (`stored_hit`): the whole blocks of the earlier context's stored KV, leaving at
        least one prompt token to prefill."""
        check_block_size(block_size)
        gen = self.turns[i - 1].gen_tokens if i else 0  # turn i-1's generation, and its prompt + generation:
        before = self.prompt_tokens(i - 1) + gen if i else 0
        return stored_hit(self.context_before(i), before, gen, self.prompt_tokens(i), block_size)

    @property
    def total_tokens(self) -> int:
        """Tokens of the final context: the last prompt plus its generation."""
        if not self.turns:
            return 0
        n = len(self.turns) - 1
        return self.prompt_tokens(n) + self.turns[n].gen_tokens

    @property
    def num_turns(self) -> int:
        return len(self.turns)

    def miss_tokens(self, i: int, block_size: int) -> int:
        """Tokens turn i prefills: its prompt minus the cached whole blocks."""
        return self.prompt_tokens(i) - self.hit_tokens(i, block_size)

    def _turn_totals(self):
        """Prompt + generation of each turn, in order (the context as `turn_shapes` counts it)."""
        ctx = 0
        for t in self.turns:
            ctx = (t.context_tokens if t.context_tokens is not None else ctx) + t.append_tokens + t.gen_tokens
            yield ctx

    def peak_turn(self) -> tuple[int, int]:
        """(index, tokens) of the turn whose prompt + generation is the largest: the most KV this agent ever
        holds at once (a decode engine must have room for it). (-1, 0) without turns."""
        best_i, best = -1, 0
        for i, total in enumerate(self._turn_totals()):
            if total > best or best_i < 0:
                best_i, best = i, total
        return best_i, best

    def cut_at_tokens(self, limit: int) -> Trajectory:
        """This trajectory up to (not including) its first turn whose prompt + generation exceeds `limit` tokens
        (a model's context window); itself when no turn does."""
        if is_bool(limit):  # True was a 1-token window: every turn cut
            raise ValueError(f"cut_at_tokens limit must be a token count, not a bool: got {limit!r}")
        # nan kept every turn (no total is > nan), a negative limit cut them all
        if not is_real(limit) or not limit >= 0:  # (inf: no window, nothing cut)
            raise ValueError(f"cut_at_tokens limit must be a token count >= 0, got {limit!r}")
        n = 0
        for total in self._turn_totals():
            if total > limit:
                break
            n += 1
        return self if n == len(self.turns) else dataclasses.replace(self, turns=list(self.turns)[:n])

    def turn_shapes(self, block_size: int) -> list[tuple[int, int, int]]:
        """(prompt, hit, gen) tokens of every turn (hit: `stored_hit`), in one O(turns) pass."""
        check_block_size(block_size)
        out, ctx, gen = [], 0, 0
        for t in self.turns:
            c = t.context_tokens if t.context_tokens is not None else ctx
            prompt = c + t.append_tokens
            out.append((prompt, stored_hit(c, ctx, gen, prompt, block_size), t.gen_tokens))
            ctx, gen = prompt + t.gen_tokens, t.gen_tokens
        return out
