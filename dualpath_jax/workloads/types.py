"""Workload types shared by the simulator, the runtime and the trace loaders (no jax).

A trajectory (agent) is a sequence of turns. Turn i's prompt is A_1, G_1, ..., A_{i-1}, G_{i-1}, A_i
(PAPER.md "Workloads"); its KV of the earlier part is a hit (loaded from storage, whole blocks only),
the rest is the miss (computed by prefill).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Turn:
    append_tokens: int  # A_i: new prompt tokens of this turn (tool output, user text)
    gen_tokens: int  # G_i: tokens generated (forced to exactly this many)
    gap_s: float = 0.0  # think/tool time after this turn's generation before the next turn arrives
    # Optional real content: the appended token ids (runtime runs use them; len == append_tokens).
    append_token_ids: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.append_tokens < 0 or self.gen_tokens < 0:
            raise ValueError(f"turn lengths must be >= 0, got append={self.append_tokens} gen={self.gen_tokens}")
        if self.gap_s < 0:
            raise ValueError(f"turn gap must be >= 0 s, got {self.gap_s}")
        if self.append_token_ids is not None and len(self.append_token_ids) != self.append_tokens:
            raise ValueError(
                f"append_token_ids has {len(self.append_token_ids)} ids but append_tokens={self.append_tokens}"
            )


@dataclasses.dataclass
class Trajectory:
    trajectory_id: int
    turns: Sequence[Turn]
    arrival_time: float = 0.0  # when the agent's first turn arrives (online / trace modes)
    source: str = ""  # where it came from (generator name, trace file)

    def context_before(self, i: int) -> int:
        """Tokens of A_1 G_1 ... A_{i-1} G_{i-1}: everything turn i re-reads."""
        return sum(t.append_tokens + t.gen_tokens for t in self.turns[:i])

    def prompt_tokens(self, i: int) -> int:
        return self.context_before(i) + self.turns[i].append_tokens

    def hit_tokens(self, i: int, block_size: int) -> int:
        """Cached prefix of turn i: the whole blocks of the earlier context (only Full Blocks are stored)."""
        return (self.context_before(i) // block_size) * block_size

    @property
    def total_tokens(self) -> int:
        return self.context_before(len(self.turns))
