"""Request lifecycle: trajectories -> turns -> requests with real token ids (no jax).

Turn i of a trajectory becomes a request when turn i-1 finished (+ its gap), or at the agent's arrival for
turn 0. Its prompt token ids are every earlier append, the tokens the model really generated for earlier
turns, and this turn's append (PAPER.md: prompt_i = A_1 G_1 ... A_{i-1} G_{i-1} A_i); a turn that states a
shorter re-read context (`Turn.context_tokens`: a trace's agent dropped text) re-reads only the first that many
tokens of it before its append. Append token ids come
from the workload when it carries them, else from an RNG seeded by (seed, trajectory, turn) over the
model's vocabulary, so every run of the same config sees the same conversations.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Sequence

import numpy as np

from dualpath_jax.workloads.types import Trajectory, Turn


@dataclasses.dataclass
class TurnRequest:
    """One turn ready to be scheduled."""

    request_id: int
    trajectory_id: int
    turn_index: int
    prompt_ids: np.ndarray  # [prompt_tokens] int32: A_1 G_1 ... A_i
    gen_tokens: int
    arrival: float  # seconds from the run start


def append_token_ids(turn: Turn, seed: int, trajectory_id: int, turn_index: int, vocab_size: int) -> np.ndarray:
    """The appended token ids of one turn: the workload's own, or seeded random ids over the vocabulary."""
    if turn.append_token_ids is not None:
        ids = np.asarray(turn.append_token_ids, dtype=np.int32)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(
                f"trajectory {trajectory_id} turn {turn_index}: append token ids outside the vocabulary [0, {vocab_size})"
            )
        return ids
    rng = np.random.default_rng([seed, trajectory_id, turn_index])
    return rng.integers(0, vocab_size, size=turn.append_tokens, dtype=np.int32)


class ConversationBook:
    """Tracks every trajectory's history and hands out turns as they become due.

    Not thread-safe: the global scheduler calls it under its own lock.
    """

    def __init__(self, trajectories: Sequence[Trajectory], vocab_size: int, seed: int = 0, arrivals=None):
        """`arrivals`: a `dualpath_jax.workloads.arrivals.ArrivalModel` (offline / online Poisson / trace
        timestamps) deciding when each agent's first turn and each next turn become ready; None = offline."""
        if arrivals is None:
            from dualpath_jax.workloads.arrivals import make_arrivals

            arrivals = make_arrivals("offline")
        self.arrivals = arrivals
        ids = [t.trajectory_id for t in trajectories]
        if len(set(ids)) != len(ids):
            raise ValueError("trajectory ids must be unique")
        self.trajectories = {t.trajectory_id: t for t in trajectories}
        self.vocab_size = vocab_size
        self.seed = seed
        self._history: dict[int, list[np.ndarray]] = {t: [] for t in self.trajectories}
        self._next_turn: dict[int, int] = {t: 0 for t in self.trajectories}
        self._due: list[tuple[float, int]] = []  # heap of (arrival, trajectory_id)
        self._request_ids: dict[tuple[int, int], int] = {}
        self._keys: dict[int, tuple[int, int]] = {}
        self.generated: dict[tuple[int, int], np.ndarray] = {}
        self.total_turns = sum(len(t.turns) for t in trajectories)
        for t, a in zip(trajectories, arrivals.agent_arrivals(trajectories), strict=True):
            if len(t.turns):
                heapq.heappush(self._due, (float(a), t.trajectory_id))
        for t in trajectories:
            for i in range(len(t.turns)):
                rid = len(self._request_ids)
                self._request_ids[(t.trajectory_id, i)] = rid
                self._keys[rid] = (t.trajectory_id, i)

    @property
    def completed_turns(self) -> int:
        return len(self.generated)

    @property
    def done(self) -> bool:
        return self.completed_turns == self.total_turns

    def next_arrival(self) -> float:
        return self._due[0][0] if self._due else math.inf

    def key_of(self, request_id: int) -> tuple[int, int]:
        return self._keys[request_id]

    def pop_due(self, now: float) -> list[TurnRequest]:
        """Turns whose arrival time has come (in arrival order)."""
        out = []
        while self._due and self._due[0][0] <= now:
            arrival, tid = heapq.heappop(self._due)
            out.append(self._make_request(tid, arrival))
        return out

    def _make_request(self, tid: int, arrival: float) -> TurnRequest:
        traj = self.trajectories[tid]
        i = self._next_turn[tid]
        turn = traj.turns[i]
        append = append_token_ids(turn, self.seed, tid, i, self.vocab_size)
        if turn.context_tokens is not None and i:  # the agent dropped text: re-read the history's first tokens only
            history = np.concatenate(self._history[tid])
            if turn.context_tokens < history.size:
                self._history[tid] = [history[: int(turn.context_tokens)]]
        self._history[tid].append(append)
        prompt = np.concatenate(self._history[tid]).astype(np.int32)
        return TurnRequest(self._request_ids[(tid, i)], tid, i, prompt, int(turn.gen_tokens), arrival)

    def complete(self, request_id: int, generated_ids: np.ndarray, finished: float) -> None:
        """Record the real generated tokens of a turn and make the trajectory's next turn due."""
        tid, i = self._keys[request_id]
        if (tid, i) in self.generated:
            raise RuntimeError(f"trajectory {tid} turn {i} completed twice")
        if self._next_turn[tid] != i:
            raise RuntimeError(f"trajectory {tid}: turn {i} completed but turn {self._next_turn[tid]} is current")
        gen = np.asarray(generated_ids, dtype=np.int32)
        turn = self.trajectories[tid].turns[i]
        if gen.shape != (turn.gen_tokens,):
            raise RuntimeError(f"trajectory {tid} turn {i}: got {gen.shape[0]} tokens, expected {turn.gen_tokens}")
        self.generated[(tid, i)] = gen
        self._history[tid].append(gen)
        self._next_turn[tid] = i + 1
        if i + 1 < len(self.trajectories[tid].turns):
            heapq.heappush(self._due, (self.arrivals.turn_ready(self.trajectories[tid], i + 1, finished), tid))


def tiny_trajectories(
    agents: int,
    turns: int,
    append_tokens: int,
    gen_tokens: int,
    first_append_tokens: int,
    gap_s: float = 0.0,
    seed: int = 0,
) -> list[Trajectory]:
    """Short seeded multi-turn agents for tiny-model runs: a long first append (the task), then short appends.

    Lengths vary +-50% around the means (seeded), so agents desynchronise like the paper's traces.
    """
    rng = np.random.default_rng(seed)
    out = []
    for a in range(agents):
        ts = []
        for i in range(turns):
            mean_append = first_append_tokens if i == 0 else append_tokens
            app = int(max(1, round(mean_append * rng.uniform(0.5, 1.5))))
            gen = int(max(1, round(gen_tokens * rng.uniform(0.5, 1.5))))
            ts.append(Turn(append_tokens=app, gen_tokens=gen, gap_s=gap_s))
        out.append(Trajectory(trajectory_id=a, turns=ts, source="tiny"))
    return out
