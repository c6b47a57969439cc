"""The contract between the scheduling policies and whatever runs them (simulator or runtime).

Policies are plain Python on the host: this module and every policy import no jax. The simulator and
the runtime build the same `ClusterSnapshot` (PAPER.md "Scheduler": engines report seq_e, tok_e and
their node's read queue) and hand the waiting requests to a registered policy, which returns
`Assignment`s: the prefill engine (PE), decode engine (DE) and read side of each request it places.
Requests it does not place stay queued for the next fetch.
"""

from __future__ import annotations

import abc
import dataclasses
import itertools
import numbers
from collections.abc import Sequence
from typing import Literal

import numpy as np

Role = Literal["prefill", "decode"]
# Which side loads the hit KV from storage: the PE's node ("pe"), the DE's node ("de"), or both ("split",
# beyond the paper: a fraction of the hit blocks from each side so both read queues drain together).
ReadSide = Literal["pe", "de", "split"]
ROLES = ("prefill", "decode")


# The per-fetch records (EngineState, NodeState, PendingRequest) have __slots__: a fetch at 48P96D reads
# thousands of their fields, and a slotted object keeps its fields in the object itself (one cache line,
# no separate values array): 6% less CPU for a whole paper-scale simulation. No other attributes can be set.
@dataclasses.dataclass(slots=True)
class EngineState:
    """What one engine reports when its group fetches (one engine = one GPU)."""

    engine_id: int
    role: Role
    node_id: int  # the node (= engine group) the engine lives on
    seq: int = 0  # seq_e: unfinished requests assigned to this engine
    tok: int = 0  # tok_e: tokens of those requests (load proxy for GPU, disk and network)
    free_hbm_tokens: int = 0  # KV capacity left in HBM, in tokens (what a DE can still admit)

    def __post_init__(self):
        if self.role not in ROLES:  # any other role would be taken for a DE by the policies
            raise ValueError(f"engine {self.engine_id}: role must be 'prefill' or 'decode', got {self.role!r}")


@dataclasses.dataclass(slots=True)
class NodeState:
    """One node: `g` engines of one role sharing one storage NIC (SNIC)."""

    node_id: int
    role: Role
    read_queue_tokens: int = 0  # read_q: hit tokens queued for storage reads on this node's SNIC
    # Optional, for a runner that keeps them up to date as its engines' loads change (the simulator):
    # Σ tok_e and Σ free_hbm_tokens of the node's engines. Policies take them only from a snapshot with an
    # `engine_set_key` (the runner's live state; a copy() has none, whatever its engines were changed to);
    # otherwise, or None (the default), policies sum the engines.
    engine_tok: int | None = None
    engine_free_hbm_tokens: int | None = None

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"node {self.node_id}: role must be 'prefill' or 'decode', got {self.role!r}")


@dataclasses.dataclass
class ClusterSnapshot:
    """The cluster as the policies see it at one fetch. Policies may mutate a copy, never the original."""

    now: float
    engines: dict[int, EngineState]
    nodes: dict[int, NodeState]
    # Optional: a runner that keeps one engine set (this very dict, holding the same EngineState objects,
    # whose engine_id/role/node_id never change in place) sets a key and changes it whenever the set
    # changes; policies then reuse what they derived from the set without re-checking every engine each
    # fetch. None (the default): checked every fetch. A copy() gets None (its EngineStates are new objects).
    engine_set_key: int | None = None

    def __post_init__(self):
        _check_loads(self.engines, self.nodes)

    def engines_of(self, role: Role, node_id: int | None = None) -> list[EngineState]:
        return [e for e in self.engines.values() if e.role == role and (node_id is None or e.node_id == node_id)]

    def copy(self) -> ClusterSnapshot:
        return ClusterSnapshot(
            now=self.now,
            engines={k: dataclasses.replace(v) for k, v in self.engines.items()},
            nodes={k: dataclasses.replace(v) for k, v in self.nodes.items()},
        )


_INF = float("inf")


_BOOLS = (bool, np.bool_)  # True compares and adds as 1: a flag where a token count belongs
_INT_FLOAT = (int, float)  # (the token counts almost always: checked by type before the Real ABC)


def _any_bool(*values) -> bool:
    """Whether one of these token counts is a bool (numpy's too)."""
    return any(isinstance(v, _BOOLS) for v in values)


def _check_loads(engines: dict[int, EngineState], nodes: dict[int, NodeState]) -> None:
    """The loads a snapshot is built with: tok, seq, read queues and the node sums >= 0, free HBM any finite number
    (a DE a request waits at is over-committed: round_robin full_de="queue"). A NaN compares false both ways
    and an inf swamps every sum, so either made the policies' choices meaningless, silently. Once per snapshot
    built (the runtime builds one per fetch; the simulator one per run and keeps it up to date with int sums)."""
    for e in engines.values():
        try:
            ok = 0 <= e.tok < _INF and 0 <= e.seq < _INF and -_INF < e.free_hbm_tokens < _INF
        except TypeError:  # not a number
            ok = False
        if not ok or _any_bool(e.tok, e.seq, e.free_hbm_tokens):  # (True was taken as a load of 1)
            raise ValueError(
                f"engine {e.engine_id}: loads must be numbers, tok and seq >= 0 and finite, free_hbm_tokens finite "
                f"(not bools); got tok={e.tok!r} seq={e.seq!r} free_hbm_tokens={e.free_hbm_tokens!r}"
            )
    for n in nodes.values():
        t, f = n.engine_tok, n.engine_free_hbm_tokens
        try:
            ok = 0 <= n.read_queue_tokens < _INF and (t is None or 0 <= t < _INF) and (f is None or -_INF < f < _INF)
        except TypeError:
            ok = False
        if not ok or _any_bool(n.read_queue_tokens, t, f):
            raise ValueError(
                f"node {n.node_id}: read_queue_tokens and engine_tok must be >= 0 and finite (not bools), "
                f"engine_free_hbm_tokens finite (or None); got read_queue_tokens={n.read_queue_tokens!r} engine_tok={t!r} "
                f"engine_free_hbm_tokens={f!r}"
            )


@dataclasses.dataclass(frozen=True, slots=True)
class PendingRequest:
    """One turn of one trajectory waiting for placement."""

    request_id: int
    trajectory_id: int
    turn_index: int
    prompt_tokens: int  # whole prompt: hit + miss
    hit_tokens: int  # prefix whose KV is loaded from storage (whole blocks)
    gen_tokens: int  # tokens the turn will generate (for DE HBM admission)
    arrival_time: float = 0.0

    def __post_init__(self):
        # (types first: a str count was a TypeError from the comparison below, naming no request; bools: below)
        for v in (self.prompt_tokens, self.hit_tokens, self.gen_tokens):
            # (int and float first: the ABC check on every turn was ~1.5% of a simulation's event loop)
            if type(v) not in _INT_FLOAT and not isinstance(v, numbers.Real) and not isinstance(v, _BOOLS):
                raise ValueError(
                    f"request {self.request_id}: token counts must be numbers, got prompt={self.prompt_tokens!r} "
                    f"hit={self.hit_tokens!r} gen={self.gen_tokens!r}"
                )
        # once per turn, so that no fetch places a negative load (also refuses NaN, and inf: such a request never
        # fits a DE and would hold the head of the queue forever)
        if not (0 <= self.hit_tokens <= self.prompt_tokens < _INF and 0 <= self.gen_tokens < _INF):
            raise ValueError(
                f"request {self.request_id}: needs 0 <= hit_tokens <= prompt_tokens and gen_tokens >= 0, all finite, got "
                f"prompt={self.prompt_tokens} hit={self.hit_tokens} gen={self.gen_tokens}"
            )
        if (
            isinstance(self.prompt_tokens, _BOOLS)
            or isinstance(self.hit_tokens, _BOOLS)
            or isinstance(self.gen_tokens, _BOOLS)
        ):
            raise ValueError(
                f"request {self.request_id}: token counts must be numbers, not bools, got prompt={self.prompt_tokens!r} "
                f"hit={self.hit_tokens!r} gen={self.gen_tokens!r}"
            )
        if self.prompt_tokens % 1 or self.hit_tokens % 1 or self.gen_tokens % 1:  # (finite here)
            raise ValueError(
                f"request {self.request_id}: token counts must be whole numbers, got prompt={self.prompt_tokens} "
                f"hit={self.hit_tokens} gen={self.gen_tokens}"
            )

    @property
    def miss_tokens(self) -> int:
        return self.prompt_tokens - self.hit_tokens

    @property
    def total_tokens(self) -> int:
        """len_r: KV tokens the request will hold on its DE by the end of decode."""
        return self.prompt_tokens + self.gen_tokens


class QueueWindow(Sequence):
    """The first `len(request_ids)` requests of a FIFO queue, with each one's `request_id` and len_r
    (`total_tokens`) in int sequences (lists or `array('q')`), index for index. Optional: a runner that
    keeps them beside its queue passes this instead of a list, so a fetch need not read every request
    object (same decisions).

    `requests` is not copied and may be longer than the window (a runner's live deque: a fetch at 48P96D
    would otherwise copy 1,024 references, touching every request object, ~60 times per simulated second);
    it must not change while a policy reads the window. The caller guarantees
    `request_ids[i] == requests[i].request_id` and `total_tokens[i] == requests[i].total_tokens`."""

    __slots__ = ("requests", "request_ids", "total_tokens")

    def __init__(self, requests: Sequence[PendingRequest], request_ids: Sequence[int], total_tokens: Sequence[int]):
        if not len(request_ids) == len(total_tokens) <= len(requests):
            raise ValueError(
                f"QueueWindow needs one request_id and one total_tokens per request: got {len(requests)} requests, "
                f"{len(request_ids)} ids, {len(total_tokens)} lengths"
            )
        self.requests = requests
        self.request_ids = request_ids
        self.total_tokens = total_tokens

    def __len__(self) -> int:
        return len(self.request_ids)

    def __iter__(self):
        return itertools.islice(self.requests, len(self.request_ids))

    def __getitem__(self, i):
        n = len(self.request_ids)
        if isinstance(i, slice):
            return list(self)[i]
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"QueueWindow index {i} out of range (window of {n})")
        return self.requests[i]


@dataclasses.dataclass(frozen=True)
class Assignment:
    """A policy's decision for one request."""

    request_id: int
    prefill_engine: int
    decode_engine: int
    read_side: ReadSide
    # Fraction of the hit blocks read on the DE side: 0.0 for "pe", 1.0 for "de", in between for "split". Left out
    # (None), it follows the read side ("split" needs it given): `Assignment(rid, pe, de, "de")` raised "read_side 'de'
    # needs de_read_fraction 1.0, got 0.0". Always a float once built.
    de_read_fraction: float | None = None

    def __post_init__(self):
        expected = {"pe": 0.0, "de": 1.0}.get(self.read_side)
        if expected is None and self.read_side != "split":  # a custom policy's "PE" was recorded as a read side
            raise ValueError(f"read_side must be 'pe', 'de' or 'split', got {self.read_side!r}")
        if self.de_read_fraction is None and expected is not None:
            object.__setattr__(self, "de_read_fraction", expected)
        # Ids are ints (numpy's kept as Python ints): True was engine 1 to a dict lookup, silently; a float engine id
        # passed the runtime's `in engines` check and named an endpoint 'engine1.0' (the run hung); a str request id
        # printed as the int. (One check for the policies' own ints and float: an Assignment per placed request.)
        if (
            type(self.request_id) is not int
            or type(self.prefill_engine) is not int
            or type(self.decode_engine) is not int
            or type(self.de_read_fraction) is not float
        ):
            self._check_types()
        if expected is not None and self.de_read_fraction != expected:
            raise ValueError(
                f"read_side {self.read_side!r} needs de_read_fraction {expected}, got {self.de_read_fraction}"
            )
        if not 0.0 <= self.de_read_fraction <= 1.0:
            raise ValueError(f"de_read_fraction must be in [0, 1], got {self.de_read_fraction}")

    def _check_types(self) -> None:
        for field in ("request_id", "prefill_engine", "decode_engine"):
            x = getattr(self, field)
            if not isinstance(x, numbers.Integral) or isinstance(x, bool):
                raise TypeError(f"Assignment {field} must be an int (not a bool), got {x!r} ({type(x).__name__})")
            object.__setattr__(self, field, int(x))
        f = self.de_read_fraction
        if not isinstance(f, numbers.Real) or isinstance(f, _BOOLS):  # (a str failed as a bare "'<=' not supported")
            given = " (read_side 'split' needs it given)" if f is None else ""
            raise TypeError(
                f"Assignment de_read_fraction must be a number in [0, 1], got {f!r} ({type(f).__name__}){given}"
            )
        object.__setattr__(self, "de_read_fraction", float(f))


def _config_or_defaults(cls: type, config):
    """`config`, or (None) the defaults of `cls.Config` where it has one."""
    if config is None and isinstance(getattr(cls, "Config", None), type):
        return cls.Config()
    return config


class InterEnginePolicy(abc.ABC):
    """Chooses (PE, DE, read side) for waiting requests. Registered by name in `schedulers.POLICIES`."""

    name: str = "?"
    # True for a policy that places requests on a DE without room on purpose (they wait at that DE for its HBM);
    # the runtime then does not hold its placements back to the DE's free decode slots.
    overcommits_decode: bool = False

    def __init__(self, config=None):
        """Built as `cls(config)` by `make_policy`: `config` is the class's `Config` instance (None: its defaults). A
        subclass that needs nothing more (the README's recipe) has no __init__ of its own (it failed as
        "takes no arguments")."""
        self.config = _config_or_defaults(type(self), config)

    @abc.abstractmethod
    def schedule(
        self,
        snapshot: ClusterSnapshot,
        queue: Sequence[PendingRequest],
        fetching_node: int | None = None,
    ) -> list[Assignment]:
        """Place some of `queue` (FIFO order), returning one Assignment per placed request.

        `fetching_node` is the engine group whose fetch triggered this call (None: consider all).
        Each request appears at most once; unplaced requests stay queued for a later fetch.
        """


@dataclasses.dataclass(frozen=True)
class PrefillWork:
    """A request queued inside one PE, as intra-engine batching sees it."""

    request_id: int
    cached_tokens: int  # tokens whose KV already exists (hit + chunks prefilled so far)
    remaining_tokens: int  # miss tokens still to prefill

    def __post_init__(self):
        # a fraction of a token: fifo formed a batch of 0.5 tokens, compute_quota an empty one (the PE never
        # progressed); negative / NaN / inf work is refused by the batchers as they reach it
        c, r = self.cached_tokens, self.remaining_tokens
        if isinstance(c, _BOOLS) or isinstance(r, _BOOLS):  # (True was one token of work)
            raise ValueError(
                f"prefill work {self.request_id}: token counts must be numbers, not bools, got cached={c!r} "
                f"remaining={r!r}"
            )
        if (c % 1 and -_INF < c < _INF) or (r % 1 and -_INF < r < _INF):  # (an int: one modulo each)
            raise ValueError(
                f"prefill work {self.request_id}: token counts must be whole numbers, got cached={c} remaining={r}"
            )


@dataclasses.dataclass(frozen=True)
class BatchItem:
    """One request's share of a forward batch: prefill `bsz` tokens on top of `cached` tokens."""

    request_id: int
    cached: int
    bsz: int


class IntraEnginePolicy(abc.ABC):
    """Forms one forward batch from a PE's local FIFO queue. Registered in `schedulers.BATCHERS`."""

    name: str = "?"

    def __init__(self, config=None):
        """Built as `cls(config)` by `make_batcher`, as InterEnginePolicy."""
        self.config = _config_or_defaults(type(self), config)

    @abc.abstractmethod
    def form_batch(self, queue: Sequence[PrefillWork]) -> list[BatchItem]:
        """Return the next batch; a request may get fewer tokens than remain (chunked prefill)."""
