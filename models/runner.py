"""ModelRunner: the per-layer jitted prefill/decode engine the runtime drives.

Construction
    ``ModelRunner(config, params=None, *, seed=0, num_slots=8, capacity=512, max_traces=None,
    min_token_bucket=16)``; ``params``: an ``nnx.State`` or pure dict of the whole model (from
    ``load_hf_checkpoint`` / ``restore_params``), or None for a random init from ``seed``; ``num_slots`` and
    ``capacity`` (the decode cache: slots x tokens) are integers >= 1.
    ``ModelRunner.from_hf(checkpoint_dir, **kw)`` loads config.json + *.safetensors.
    ``runner.layout`` (KVLayout), ``runner.fingerprint()`` (config format + weights digest: equal weights
    give equal ids however loaded), ``runner.params`` (nnx.State) / ``runner.pure_params()`` (dict, for
    ``save_params``), ``runner.trace_counts`` (Counter: step name -> traces), ``runner.num_layer_kinds``.
    Tiny configs by name: ``models.registry.tiny_config("tiny_qwen2" | "tiny_llama" | "tiny_deepseek" |
    "tiny_deepseek_v2", **overrides)``.

Prefill (PE side)
    ``prefill_layerwise(requests, cached_kv_provider=None, on_layer_kv=None, *, return_kv=False, h2d=None)
    -> PrefillResult``
      * ``requests``: ``Sequence[PrefillRequest(miss_token_ids [m] int, cached_len)]`` (m >= 1; cached
        lengths may differ per request and be 0).
      * ``cached_kv_provider(layer) -> Sequence[kv | None]``: called once per layer, in layer order, one
        step ahead of the compute (layer l+1 is fetched while layer l runs). Per request the cached KV of
        that layer covering exactly ``cached_len`` tokens, as records ``[c, *record]`` of kv_dtype, or raw
        bytes uint8 ``[c, bpt]`` or a Layer Block ``[1, c, bpt]``, or a list of such pieces in token order
        (e.g. ``[layer_block(fb, layer) for fb in full_blocks]``); None when cached_len == 0. Not needed when
        every cached_len is 0. A piece of more than one layer (a Full Block ``[L, tokens, bpt]``, records
        ``[L, c, *record]``, a stack ``[n, block, bpt]``) is refused, naming the layer and request.
      * ``h2d(layer, nbytes)``: optional, called inside each layer's load (so one step ahead of the compute too)
        with the bytes of cached KV it copies host -> device (sum of cached lengths x bytes per token per layer,
        no padding), right before the copy: the runtime paces them on the engine's emulated CNIC here.
      * ``on_layer_kv(layer, miss_kv)``: called once per layer with, per request, the miss KV records
        ``[m, *record]`` (numpy views; ``runner.layout.to_bytes`` gives the Layer Block bytes). Called for
        layer l after layer l+1 was dispatched, so sending overlaps compute.
      * ``PrefillResult.next_tokens [B] int32`` (greedy first token), ``last_logits [B, V] float32``,
        ``miss_kv`` (``[L, m, *record]`` per request when return_kv), ``device_busy`` (perf_counter spans during
        which the device was still computing the batch while a provider / h2d call ran: a caller that times waits in
        them counts their overlap as compute; JAX dispatches asynchronously).
    ``prefill_whole(requests, cached_kv=None, *, all_logits=False) -> (kv_new, logits, miss_lens)``: the
        same computation as ONE jit of the whole model (cached_kv: per request records ``[L, c, *record]``);
        the benchmark baseline. Device arrays ``kv_new [L, B_bucket, T_bucket, *record]``, ``logits
        [B_bucket, V]`` (``[B_bucket, T_bucket, V]`` with all_logits); ``miss_lens [B_bucket]`` numpy.
    ``full_prefill(token_ids_batch) -> (logits, kv)``: reference without cache; per request logits
        ``[n, V]`` float32 and KV records ``[L, n, *record]``.

Decode (DE side; continuous batching over a fixed number of slots, fixed capacity per slot)
    ``load_prompt_kv(slot, kv)``: kv = records/bytes ``[L, P, ...]`` or a list of Full Blocks (uint8
        ``[L, tokens, bpt]``); the slot then holds a sequence of length P (P may be 0). A slot that already
        holds one is refused (ValueError; ``free_slot`` it first).
    ``decode_step(slots, last_tokens) -> next_tokens [len(slots)] int32``: one token for each given slot
        (others idle); appends the KV of ``last_tokens`` at each slot's length, then length += 1. Every
        slot must hold a sequence (loaded, not freed since), be in range and appear once; else ValueError
        naming it, before anything runs. The step always runs over all N slots (one executable whatever
        joins or leaves); it returns after the step completed. Not thread-safe per runner: one thread
        drives one runner's decode (a ``copy.copy(runner)`` + ``init_decode`` shares weights and
        executables with its own cache).
    ``slot_length(slot)`` (0 for an empty slot), ``slot_in_use(slot)``, ``free_slot(slot)`` (empties it;
    freeing an empty slot is a no-op), ``read_kv(slot, start, num_tokens) -> [L, n, *record]``,
    ``read_full_block(slot, block_index, block_size) -> uint8 [L, block_size, bpt]`` (write-back; both
    refuse an empty slot).

Steps (all ``jax.jit`` over pure functions of split state; layer index never static)
    ``embed_step(embed_state, tokens [B, T]) -> hidden [B, T, H]`` (decode uses its own
    ``decode_embed_step`` / ``decode_head_step`` executables of shape [N, 1]);
    ``prefill_steps[kind](layer_state, kv_cached [B, C, *record], hidden, PrefillMeta) -> (kv_new, hidden)``;
    ``decode_steps[kind](layer_state, cache, hidden [N, 1, H], DecodeMeta) -> (cache, hidden)`` (cache
    donated); ``head_step(embed_state, final_state, hidden, last_idx [B]) -> (logits [B, V], tokens [B])``.
    ``kind = runner.layer_kind[layer]``, state ``runner.layer_states[layer]``. Identical layers share a
    kind (equal graphdef) and so one executable per bucket. Buckets: batch and miss-token counts padded to
    powers of two (tokens >= min_token_bucket), cached length to a power of two >= min_token_bucket (or 0).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import hashlib
import itertools
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
import xxhash
from flax import nnx

from models import decode_cache
from models.kv import KVLayout
from models.layers.invariant import padded_keys
from models.meta import DecodeMeta, PrefillMeta
from models.registry import family

_SERIAL = itertools.count()


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    n = max(int(n), int(minimum), 1)
    return 1 << (n - 1).bit_length()


@dataclasses.dataclass
class PrefillRequest:
    """One prompt of a prefill batch: its miss tokens (those prefill computes, after `cached_len` hit tokens whose KV
    the provider feeds layer by layer; positions start at `cached_len`)."""

    miss_token_ids: np.ndarray  # [m] int: the tokens prefill computes (m >= 1)
    cached_len: int = 0  # hit tokens whose KV the provider feeds layer by layer


@dataclasses.dataclass
class PrefillResult:
    """What a prefill returns per prompt of the batch (B prompts, vocabulary V)."""

    next_tokens: np.ndarray  # [B] int32 greedy token following each prompt
    last_logits: np.ndarray  # [B, V] float32 logits at each prompt's last token
    miss_kv: list[np.ndarray] | None = None  # per request [L, m, *record] (return_kv=True)
    # perf_counter spans (start, end), in order and disjoint: the device was still computing this batch's steps while
    # a callback (cached_kv_provider, h2d) ran, from the callback's start until the steps dispatched before it were
    # done. A caller whose callbacks wait (for a DE's layers, for a CNIC) counts the waits' overlap with these spans as
    # compute, not as waiting (`engines.PrefillEngine._run_batch`).
    device_busy: list[tuple[float, float]] = dataclasses.field(default_factory=list)


class _DeviceWatch:
    """A thread's watcher of its device work: JAX dispatches asynchronously and calls nothing back when a step is
    done, so a side thread blocks on each watched output in turn. `watch(out, spans)` appends (now, the time `out`
    was ready) to spans; `sync()` returns once every earlier watch is stamped. One per thread, so a thread's watches
    are in its dispatch order (PEs sharing a runner each have theirs); the side thread ends with its owner's."""

    _of_thread = threading.local()

    @classmethod
    def of_this_thread(cls) -> _DeviceWatch:
        watch = getattr(cls._of_thread, "watch", None)
        if watch is None or watch.pid != os.getpid():  # (a forked child has the thread-local, not the side thread)
            watch = cls._of_thread.watch = cls()
        return watch

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        name = f"device-watch-{threading.current_thread().name}"
        threading.Thread(target=_stamp_when_ready, args=(self._queue,), name=name, daemon=True).start()
        weakref.finalize(self, self._queue.put, None)  # (its owner ended: the thread-local one is collected)

    def watch(self, out: jax.Array, spans: list) -> None:
        self._queue.put((time.perf_counter(), out, spans))

    def sync(self) -> None:
        stamped = threading.Event()
        self._queue.put((0.0, None, stamped))
        stamped.wait()


def _stamp_when_ready(watches: queue.SimpleQueue) -> None:
    while (item := watches.get()) is not None:
        t, out, spans = item
        if out is None:
            spans.set()  # (a sync)
            continue
        try:
            out.block_until_ready()
        except Exception:  # noqa: BLE001 -- the owner's own read of the batch raises it
            continue
        spans.append((t, time.perf_counter()))


CachedKVProvider = Callable[[int], Sequence[object]]
MissKVCallback = Callable[[int, list[np.ndarray]], None]


# ---- pure step functions (graphdef bound with functools.partial; jitted per runner) ----
def _embed(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


def _head(graphdef, embed_state, state, hidden, last_idx):
    head = nnx.merge(graphdef, state)
    x = jnp.take_along_axis(hidden, last_idx[:, None, None], axis=1)[:, 0]  # [B, H]
    logits = head(x, embed_state["embedding"][...])
    return logits, jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _prefill_layer(graphdef, state, kv_cached, hidden, meta):
    return nnx.merge(graphdef, state).prefill(kv_cached, hidden, meta)


def _decode_layer(graphdef, state, cache, hidden, meta):
    return nnx.merge(graphdef, state).decode(cache, hidden, meta)


def _check_decode_shape(num_slots, capacity) -> None:
    """ValueError naming both unless the decode cache's `num_slots` and `capacity` are integers >= 1. (2.5 slots was
    truncated to 2; 0 slots or 0 tokens made a runner whose every load or decode step was refused later.)"""
    ints = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (num_slots, capacity))
    if not ints or num_slots < 1 or capacity < 1:
        raise ValueError(f"decode cache of num_slots={num_slots!r}, capacity={capacity!r}: both must be integers >= 1")


class ModelRunner:
    """Per-layer jitted prefill and decode for one model (see the module docstring for the API)."""

    def __init__(
        self,
        config,
        params=None,
        *,
        seed: int = 0,
        num_slots: int = 8,
        capacity: int = 512,
        max_traces: int | None = None,
        min_token_bucket: int = 16,
        weights_id: str | None = None,
    ):
        _check_decode_shape(num_slots, capacity)  # (before the model is built: a bad value was accepted, or said late)
        self.config = config
        self.layout: KVLayout = config.kv_layout
        self.num_layers = config.num_layers
        self.min_token_bucket = min_token_bucket
        self.device = None  # None: JAX's default device; `on_device` binds a copy to another
        model_cls = family(config).model_cls
        abstract = nnx.eval_shape(lambda: model_cls(config, nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)
        if params is None:
            nnx.replace_by_pure_dict(state, random_params(nnx.to_pure_dict(state), seed))
            model = nnx.merge(graphdef, state)
        else:
            pure = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
            expected = nnx.to_pure_dict(state)
            _check_param_shapes(expected, pure)
            nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
            # Cast to the config's dtype (e.g. fp32 arrays into a bf16 config), never silently mixed.
            cast = jax.tree.map(lambda a, e: a.astype(e.dtype), nnx.to_pure_dict(state), expected)
            _check_cast_finite(pure, cast)
            nnx.replace_by_pure_dict(state, cast)
            model = nnx.merge(graphdef, state)
        self.model = model
        # Equal weights -> equal id, however they were obtained (seed, HF import, orbax restore).
        self._weights_id = weights_id or _weights_digest(nnx.to_pure_dict(nnx.state(model)))

        self._serial = next(_SERIAL)
        self.trace_counts: collections.Counter = collections.Counter()
        self._max_traces = max_traces

        # bfloat16 / float16: every step rounds as its dtype says. XLA keeps values in float32 between fused ops by
        # default ("excess precision"), and how much depends on the program, so one jit of the whole model
        # (full_prefill, the reference) and the per-layer steps gave KV 1-2 bf16 ulps apart for the same prompt.
        jit = functools.partial(jax.jit, compiler_options=_rounding_options(config.dtype))
        embed_gd, self.embed_state = nnx.split(model.embed_tokens)
        head_gd, self.final_state = nnx.split(model.final)
        self.embed_step = jit(self._counted("embed", functools.partial(_embed, embed_gd)))
        self.head_step = jit(self._counted("head", functools.partial(_head, head_gd)))
        # Decode has its own embed/head executables (shape [N, 1]: one bucket, separate from prefill's).
        self.decode_embed_step = jit(self._counted("decode_embed", functools.partial(_embed, embed_gd)))
        self.decode_head_step = jit(self._counted("decode_head", functools.partial(_head, head_gd)))

        # Group layers by graphdef: equal graphs share one jitted step (one executable per bucket).
        self._kind_graphdefs: list = []
        self.layer_kind: list[int] = []
        self.layer_states: list = []
        for layer in model.layers:
            gd, st = nnx.split(layer)
            same = [k for k, known in enumerate(self._kind_graphdefs) if known == gd]
            if same:
                k = same[0]
            else:
                self._kind_graphdefs.append(gd)
                k = len(self._kind_graphdefs) - 1
            self.layer_kind.append(k)
            self.layer_states.append(st)
        self.prefill_steps = [
            jit(self._counted(f"prefill_layer{k}", functools.partial(_prefill_layer, gd)))
            for k, gd in enumerate(self._kind_graphdefs)
        ]
        self.decode_steps = [
            jit(
                self._counted(f"decode_layer{k}", functools.partial(_decode_layer, gd)),
                donate_argnums=(1,),
            )
            for k, gd in enumerate(self._kind_graphdefs)
        ]
        self._whole = jit(self._counted("whole_prefill", self._whole_prefill_fn), static_argnums=(5,))
        layout = self.layout
        self._write_kv = jax.jit(
            self._counted(
                "write_kv",
                lambda caches, slot, records: tuple(
                    decode_cache.write_records(layout, decode_cache.clear_slot(c, slot), slot, jnp.int32(0), records[i])
                    for i, c in enumerate(caches)
                ),
            ),
            donate_argnums=(0,),
        )
        self._read_kv = jax.jit(
            self._counted(
                "read_kv",
                lambda caches, slot, start, n: jnp.stack(
                    [decode_cache.read_records(layout, c, slot, start, n) for c in caches]
                ),
            ),
            static_argnums=(3,),
        )
        self.init_decode(num_slots, capacity)

    @property
    def weights_device(self):
        """The device this runner's weights are on (its embedding table's; every weight is made in one place)."""
        (device,) = jax.tree.leaves(self.embed_state)[0].devices()
        return device

    def on_device(self, device) -> ModelRunner:
        """A copy of this runner whose weights and decode cache live on `device` (a `jax.Device`), so its steps run
        there: the jitted steps are shared (JAX compiles them once per device), inputs built on the host follow
        the committed weights, and the cached KV each layer loads is put on `device` directly. (An engine per
        accelerator of a host: `runtime.node`.) The original's weights stay where they are."""
        out = copy.copy(self)
        out.device = device
        out.embed_state = jax.device_put(self.embed_state, device)
        out.final_state = jax.device_put(self.final_state, device)
        out.layer_states = [jax.device_put(st, device) for st in self.layer_states]
        out.init_decode(self.num_slots, self.capacity)
        return out

    # ---- bookkeeping ----
    def _counted(self, name: str, fn: Callable) -> Callable:
        """Count traces per step name (benchmarks) and, if max_traces, assert it with chex."""

        # float32 computes in float32 on every backend: XLA:GPU's default float32 dot is TF32 (layerwise vs full
        # prefill 1.2e-3 apart on an H200, 2026-12-04); set at trace time, so it is in every step's dots
        precision = "float32" if self.config.dtype == "float32" else None

        def step(*args):
            self.trace_counts[name] += 1
            with jax.default_matmul_precision(precision):
                return fn(*args)

        if self._max_traces is not None:
            # chex keys its counter on the function's name and source: make the name unique per runner.
            step.__name__ = f"{name}_runner{self._serial}"
            step = chex.assert_max_traces(step, n=self._max_traces)
        return step

    @property
    def num_layer_kinds(self) -> int:
        return len(self._kind_graphdefs)

    @property
    def params(self) -> nnx.State:
        return nnx.state(self.model)

    def pure_params(self) -> dict:
        """Params as a nested dict of arrays (layer list keys are ints): what save_params/HF export take."""
        return nnx.to_pure_dict(self.params)

    def fingerprint(self) -> str:
        """KV format fingerprint + weights id: KV is only reusable by a runner with an equal fingerprint."""
        return f"{self.config.fingerprint()}/w{self._weights_id}"

    @classmethod
    def from_hf(cls, checkpoint_dir, *, dtype: str = "float32", **kw) -> ModelRunner:
        from models.checkpoint import load_hf_checkpoint

        config, params = load_hf_checkpoint(checkpoint_dir, dtype=dtype)
        return cls(config, params, **kw)

    # ---- prefill ----
    def _batch(self, requests: Sequence[PrefillRequest]):
        if not requests:
            raise ValueError("prefill needs at least one request")
        miss = [np.asarray(r.miss_token_ids) for r in requests]
        for i, (r, m) in enumerate(zip(requests, miss, strict=True)):
            if m.ndim != 1:  # ids [2, m] (two prompts) ran as one prompt of both, flattened
                raise ValueError(f"request {i}: token ids of shape {m.shape}; miss_token_ids is one 1-D id array")
            if m.size == 0:
                raise ValueError(f"request {i}: no miss tokens (prefill computes at least the last prompt token)")
            if not isinstance(r.cached_len, (int, np.integer)) or isinstance(r.cached_len, bool):
                raise ValueError(f"request {i}: cached_len={r.cached_len!r} must be an integer")  # 2.5 -> 2 tokens
            if r.cached_len < 0:
                raise ValueError(f"request {i}: cached_len={r.cached_len} < 0")
            if not np.issubdtype(m.dtype, np.integer):  # 3.7 was silently cast to token 3
                raise ValueError(f"request {i}: token ids must be integers, got {m.dtype}")
            if m.min() < 0 or m.max() >= self.config.vocab_size:
                raise ValueError(f"request {i}: token id out of range [0, {self.config.vocab_size})")
        b = bucket(len(requests))
        t = bucket(max(m.size for m in miss), self.min_token_bucket)
        max_c = max(r.cached_len for r in requests)
        c = bucket(max_c, self.min_token_bucket) if max_c else 0
        tokens = np.zeros((b, t), np.int32)
        cached_lens = np.zeros((b,), np.int32)
        miss_lens = np.zeros((b,), np.int32)
        for i, (r, m) in enumerate(zip(requests, miss, strict=True)):
            tokens[i, : m.size] = m
            cached_lens[i], miss_lens[i] = r.cached_len, m.size
        meta = PrefillMeta(jnp.asarray(cached_lens), jnp.asarray(miss_lens))
        return tokens, meta, miss_lens, c

    def _assemble_cached(self, requests, layer: int, per_request: Sequence[object], c: int) -> np.ndarray:
        """Per-request cached KV of one layer -> padded records [B_bucket, C, *record] (zeros beyond)."""
        rec = self.layout.record_shape
        if len(per_request) != len(requests):
            raise ValueError(
                f"layer {layer}: provider gave KV for {len(per_request)} requests, batch has {len(requests)}"
            )
        out = np.empty((bucket(len(requests)), c, *rec), self.layout.np_dtype)
        out[len(requests) :] = 0  # padding requests
        bpt = self.layout.bytes_per_token_per_layer
        out_bytes = out.view(np.uint8).reshape(out.shape[0], c, bpt)  # the same memory, as Layer-Block bytes
        for i, (r, kv) in enumerate(zip(requests, per_request, strict=True)):
            if r.cached_len and kv is None:
                raise ValueError(f"layer {layer}, request {i}: cached_len={r.cached_len} but the provider gave None")
            # One copy per piece straight into the batch buffer (Layer Blocks are not concatenated first).
            # KV given for cached_len 0 is counted too: a mismatch, never silently ignored.
            pieces = [] if kv is None else kv if isinstance(kv, (list, tuple)) else [kv]
            filled = 0
            for piece in pieces:
                piece = np.asarray(piece)
                if piece.dtype == np.uint8 and piece.shape[-1:] == (bpt,):  # bytes: copy them as they are
                    if piece.ndim > 3 or (piece.ndim == 3 and piece.shape[0] != 1):
                        raise ValueError(f"layer {layer}, request {i}: {self._not_one_layer(piece.shape)}")
                    n = piece.size // bpt
                    if filled + n <= r.cached_len:
                        out_bytes[i, filled : filled + n] = piece.reshape(n, bpt)
                else:
                    try:
                        recs = self._as_token_records(piece)
                    except ValueError as e:
                        raise ValueError(f"layer {layer}, request {i}: {e}") from None
                    n = recs.shape[0]
                    if filled + n <= r.cached_len:
                        out[i, filled : filled + n] = recs
                filled += n
            if filled != r.cached_len:
                raise ValueError(
                    f"layer {layer}, request {i}: provider gave KV of {filled} tokens, cached_len={r.cached_len}"
                )
            out[i, r.cached_len :] = 0  # masked, but must be finite (0 x NaN would poison the softmax sum)
        return out

    def _as_token_records(self, kv) -> np.ndarray:
        """Records [n, *record] (a view) from one layer's records [n, *record] / [1, n, *record] or bytes uint8
        [n, bpt] / [1, n, bpt] (a Layer Block)."""
        recs = self.layout.as_records(np.asarray(kv))
        lead = recs.ndim - len(self.layout.record_shape)
        if lead > 2 or (lead == 2 and recs.shape[0] != 1):
            raise ValueError(self._not_one_layer(np.shape(kv)))
        return recs.reshape(-1, *self.layout.record_shape)

    def _not_one_layer(self, shape) -> str:
        # A Full Block [L, tokens, bpt] (or records [L, c, *record]) was counted as L x tokens tokens and, when that
        # equalled cached_len, fed the other layers' KV in as tokens: a wrong result, no error
        bpt, rec = self.layout.bytes_per_token_per_layer, self.layout.record_shape
        return (
            f"cached KV piece of shape {tuple(shape)} is not one layer's KV: give Layer Blocks [1, tokens, {bpt}] "
            f"(layer_block(full_block, layer)), bytes [tokens, {bpt}] or records [tokens, *{rec}] (a Full Block "
            f"[L, tokens, bpt] holds every layer)"
        )

    def prefill_layerwise(
        self,
        requests: Sequence[PrefillRequest],
        cached_kv_provider: CachedKVProvider | None = None,
        on_layer_kv: MissKVCallback | None = None,
        *,
        return_kv: bool = False,
        h2d: Callable[[int, int], None] | None = None,
    ) -> PrefillResult:
        """Layer-by-layer prefill of the miss tokens over per-request cached prefixes (module docstring)."""
        tokens, meta, miss_lens, c = self._batch(requests)
        if c and cached_kv_provider is None:
            raise ValueError("requests have cached prefixes but no cached_kv_provider was given")
        empty = jnp.zeros((tokens.shape[0], 0, *self.layout.record_shape), self.layout.np_dtype)
        # Bytes of cached KV one layer's load copies host -> device (the requests' own, not the bucket padding).
        h2d_nbytes = sum(int(r.cached_len) for r in requests) * self.layout.bytes_per_token_per_layer

        # The device's busy spans while the callbacks ran (PrefillResult.device_busy): the step dispatched last, not
        # done when a layer's load begins, is watched until it is (the steps run in order: it is done last).
        watched: list[tuple[float, float]] = []
        watches = 0

        def load(layer: int, in_flight: jax.Array):
            nonlocal watches
            if not c:
                return empty
            if not in_flight.is_ready():
                _DeviceWatch.of_this_thread().watch(in_flight, watched)
                watches += 1
            host = self._assemble_cached(requests, layer, cached_kv_provider(layer), c)
            if h2d is not None:
                h2d(layer, h2d_nbytes)  # e.g. an emulated CNIC: blocks until the bytes may cross into HBM
            return jax.device_put(host, self.device)

        collected: list[list[np.ndarray]] = [[] for _ in requests]

        def deliver(layer: int, kv_new: jax.Array):
            host = np.asarray(kv_new)  # [B_bucket, T, *record]
            per_request = [host[i, : miss_lens[i]] for i in range(len(requests))]
            if on_layer_kv is not None:
                on_layer_kv(layer, per_request)
            if return_kv:
                for i, kv in enumerate(per_request):
                    collected[i].append(kv)

        hidden = self.embed_step(self.embed_state, jnp.asarray(tokens))
        kv_next = load(0, hidden)
        pending = None
        for layer in range(self.num_layers):
            kv_cached = kv_next
            step = self.prefill_steps[self.layer_kind[layer]]
            kv_new, hidden = step(self.layer_states[layer], kv_cached, hidden, meta)  # async dispatch
            kv_new.copy_to_host_async()
            if layer + 1 < self.num_layers:
                kv_next = load(layer + 1, hidden)  # host-side fetch of layer l+1 overlaps layer l's compute
            if pending is not None:
                deliver(*pending)
            pending = (layer, kv_new)
        deliver(*pending)
        logits, next_tokens = self.head_step(
            self.embed_state,
            self.final_state,
            hidden,
            jnp.asarray(np.maximum(miss_lens - 1, 0)),
        )
        n = len(requests)
        next_tokens, logits = np.asarray(next_tokens)[:n], np.asarray(logits)[:n]
        if len(watched) < watches:  # (the side thread appends them)
            _DeviceWatch.of_this_thread().sync()
        device_busy: list[tuple[float, float]] = []
        for start, end in watched:
            if device_busy and start <= device_busy[-1][1]:  # (still busy when the next load began: one span)
                prev_start, prev_end = device_busy.pop()
                start, end = prev_start, max(prev_end, end)
            device_busy.append((start, end))
        return PrefillResult(
            next_tokens=next_tokens,
            last_logits=logits,
            miss_kv=[np.stack(kvs) for kvs in collected] if return_kv else None,
            device_busy=device_busy,
        )

    def _whole_prefill_fn(
        self,
        embed_state,
        layer_states,
        final_state,
        kv_cached,
        tokens,
        all_logits,
        meta,
    ):
        hidden = _embed(nnx.graphdef(self.model.embed_tokens), embed_state, tokens)
        kv_new = []
        for layer, st in enumerate(layer_states):
            kv, hidden = _prefill_layer(
                self._kind_graphdefs[self.layer_kind[layer]],
                st,
                kv_cached[layer],
                hidden,
                meta,
            )
            kv_new.append(kv)
        head = nnx.merge(nnx.graphdef(self.model.final), final_state)
        if all_logits:
            logits = head(hidden, embed_state["embedding"][...])  # [B, T, V]
        else:
            last = jnp.maximum(meta.miss_lens - 1, 0)
            logits = head(
                jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0],
                embed_state["embedding"][...],
            )
        return jnp.stack(kv_new), logits

    def prefill_whole(
        self,
        requests: Sequence[PrefillRequest],
        cached_kv: Sequence[np.ndarray | None] | None = None,
        *,
        all_logits: bool = False,
    ) -> tuple[jax.Array, jax.Array, np.ndarray]:
        """One jit of the whole model over the same batch (baseline). cached_kv: per request [L, c, *record]."""
        tokens, meta, miss_lens, c = self._batch(requests)
        if c and cached_kv is None:
            raise ValueError("requests have cached prefixes but no cached_kv was given")
        if cached_kv is not None:
            if len(cached_kv) != len(requests):
                raise ValueError(f"cached_kv for {len(cached_kv)} requests, batch has {len(requests)}")
            cached_kv = [None if kv is None else np.asarray(kv) for kv in cached_kv]
            rec = self.layout.record_shape
            for i, kv in enumerate(cached_kv):
                # Records [L, c, *record] or bytes [L, c, bpt]. A list of L Full Blocks ([L, L, tokens, bpt] once
                # stacked) passed the layer count and fed block l, its layers read as tokens, to layer l.
                ndim = 3 if kv is not None and kv.dtype == np.uint8 else 2 + len(rec)
                if kv is not None and (kv.ndim != ndim or kv.shape[0] != self.num_layers):
                    raise ValueError(
                        f"request {i}: cached_kv has shape {kv.shape}, expected [{self.num_layers}, tokens, *{rec}] "
                        f"or bytes [{self.num_layers}, tokens, {self.layout.bytes_per_token_per_layer}] (Full Blocks: "
                        f"concatenate them on axis 1)"
                    )
                # With every cached_len 0 the KV was never looked at (the layerwise path counts it: an error).
                if not c and kv is not None and kv.shape[1]:
                    raise ValueError(f"request {i}: cached_kv of {kv.shape[1]} tokens given, cached_len=0")
        per_layer = []
        for layer in range(self.num_layers):
            if c:
                layer_kv = [None if kv is None else kv[layer] for kv in cached_kv]
                per_layer.append(self._assemble_cached(requests, layer, layer_kv, c))
            else:
                per_layer.append(
                    np.zeros(
                        (tokens.shape[0], 0, *self.layout.record_shape),
                        self.layout.np_dtype,
                    )
                )
        kv_new, logits = self._whole(
            self.embed_state,
            tuple(self.layer_states),
            self.final_state,
            tuple(per_layer),
            jnp.asarray(tokens),
            all_logits,
            meta,
        )
        return kv_new, logits, miss_lens

    def full_prefill(self, token_ids_batch: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Reference prefill without cache: per request logits [n, V] float32 and KV records [L, n, *record]."""
        ids = [np.asarray(t) for t in token_ids_batch]
        for i, t in enumerate(ids):  # full_prefill(prompt) ran len(prompt) requests of one token each
            if t.ndim != 1:
                raise ValueError(
                    f"request {i}: token ids of shape {t.shape}; full_prefill takes a batch, a list of 1-D id arrays"
                )
        requests = [PrefillRequest(t, 0) for t in ids]
        kv_new, logits, miss_lens = self.prefill_whole(requests, all_logits=True)
        kv_new, logits = (
            np.asarray(kv_new),
            np.asarray(logits),
        )  # [L, B, T, *record], [B, T, V]
        return (
            [logits[i, : miss_lens[i]] for i in range(len(requests))],
            [kv_new[:, i, : miss_lens[i]] for i in range(len(requests))],
        )

    # ---- decode ----
    def init_decode(self, num_slots: int, capacity: int) -> None:
        """(Re)allocate the decode cache: num_slots rows of capacity tokens per layer; all slots empty."""
        _check_decode_shape(num_slots, capacity)
        self.num_slots, self.capacity = int(num_slots), int(capacity)
        self.decode_caches = [
            # Batch-invariant attention reads whole key tiles: rows rounded up (tokens beyond capacity unused).
            decode_cache.init_layer_cache(
                self.layout,
                self.num_slots,
                padded_keys(self.capacity) if self.config.batch_invariant else self.capacity,
            )
            for _ in range(self.num_layers)
        ]
        if self.device is not None:  # (`on_device`: the cache where the weights are)
            self.decode_caches = [jax.device_put(c, self.device) for c in self.decode_caches]
        self.slot_lengths = np.zeros((self.num_slots,), np.int32)
        # Which slots hold a sequence (load_prompt_kv .. free_slot). Kept apart from the length: a loaded
        # prompt may be empty, and an empty slot decoded as if it held a prompt of length 0.
        self._in_use = np.zeros((self.num_slots,), bool)

    def _check_slot(self, slot: int) -> None:
        # slot 0.5 wrote slot 0, True slot 1
        if not isinstance(slot, (int, np.integer)) or isinstance(slot, bool) or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot!r} out of range [0, {self.num_slots})")

    def _check_in_use(self, slot: int) -> None:
        self._check_slot(slot)
        if not self._in_use[slot]:
            raise ValueError(f"slot {slot} holds no sequence (never loaded with load_prompt_kv, or freed since)")

    def load_prompt_kv(self, slot: int, kv) -> None:
        """Place a prompt's KV (records/bytes [L, P, ...] or a list of Full Blocks) into an empty `slot`; length = P.
        A slot holding a sequence is refused (free_slot it first): replacing it silently lost another request."""
        self._check_slot(slot)
        if self._in_use[slot]:
            raise ValueError(
                f"slot {slot} holds a sequence of {self.slot_lengths[slot]} tokens; free_slot({slot}) before loading"
            )
        rec = self.layout.record_shape
        if isinstance(kv, (list, tuple)):
            # Each block on its own: a block of another layer count, bpt or dtype was numpy's bare "all the input
            # array dimensions except for the concatenation axis must match exactly" (or "same number of
            # dimensions"), naming neither the slot nor the block
            parts = []
            for i, b in enumerate(kv):
                try:
                    part = self.layout.as_records(np.asarray(b))
                except ValueError as e:
                    raise ValueError(f"slot {slot}: Full Block {i}: {e}") from None
                if part.shape[:1] != (self.num_layers,) or part.ndim != 2 + len(rec):
                    raise ValueError(
                        f"slot {slot}: Full Block {i} has shape {np.shape(b)}, expected "
                        f"[{self.num_layers}, tokens, {self.layout.bytes_per_token_per_layer}] (or records "
                        f"[{self.num_layers}, tokens, *{rec}])"
                    )
                parts.append(part)
            kv = np.concatenate(parts, axis=1) if parts else np.zeros((self.num_layers, 0, *rec), self.layout.np_dtype)
        try:
            recs = self.layout.as_records(np.asarray(kv))
        except ValueError as e:
            raise ValueError(f"slot {slot}: {e}") from None
        if recs.shape[:1] != (self.num_layers,) or recs.ndim != 2 + len(rec):  # a reshape mixed layers and tokens
            raise ValueError(
                f"slot {slot}: prompt KV has shape {np.shape(kv)}, expected [{self.num_layers}, tokens, *{rec}] "
                f"or bytes [{self.num_layers}, tokens, {self.layout.bytes_per_token_per_layer}]"
            )
        p = recs.shape[1]
        if p > self.capacity:
            raise ValueError(f"prompt of {p} tokens exceeds decode capacity {self.capacity}")
        pb = min(bucket(p, self.min_token_bucket), self.capacity)
        padded = np.zeros((self.num_layers, pb, *self.layout.record_shape), self.layout.np_dtype)
        padded[:, :p] = recs
        # Padding beyond p is written too (same executable per bucket); it is masked by the length. The rest of the
        # slot's row is zeroed first: masked keys weigh exactly 0, but 0 x inf = NaN, so a non-finite record left by
        # the slot's previous sequence poisoned every decode step of the next one.
        self.decode_caches = list(self._write_kv(tuple(self.decode_caches), jnp.int32(slot), jnp.asarray(padded)))
        # Waited for: dispatch is asynchronous, and a caller stamps or times the load when this returns (the DE's
        # first_token and busy_s); the next decode step would otherwise pay for it.
        jax.block_until_ready(self.decode_caches)
        self.slot_lengths[slot] = p
        self._in_use[slot] = True

    def decode_step(self, slots: Sequence[int], last_tokens: Sequence[int]) -> np.ndarray:
        """One greedy token for each slot in `slots` given its last token; other slots idle."""
        slots = np.asarray(slots).reshape(-1)
        last_tokens = np.asarray(last_tokens).reshape(-1)
        if slots.size != last_tokens.size:
            raise ValueError(f"{slots.size} slots but {last_tokens.size} last tokens")
        if slots.size == 0:
            return np.zeros((0,), np.int32)
        if not (np.issubdtype(slots.dtype, np.integer) and np.issubdtype(last_tokens.dtype, np.integer)):
            raise ValueError(f"slots and last tokens must be integers, got {slots.dtype} and {last_tokens.dtype}")
        # Checked here: on device an id outside the vocabulary embeds as NaN (or wraps) and poisons the slot's KV.
        bad = (last_tokens < 0) | (last_tokens >= self.config.vocab_size)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"slot {slots[i]}: last token {last_tokens[i]} out of range [0, {self.config.vocab_size})")
        slots, last_tokens = slots.astype(np.int64), last_tokens.astype(np.int32)
        if len(set(slots.tolist())) != slots.size:
            raise ValueError(f"duplicate slots in decode batch: {slots.tolist()}")
        for s in slots:
            # An empty slot (never loaded, or freed) decoded as a fresh sequence: a token out of no context,
            # KV written at position 0 of a slot the caller thinks is someone else's (or nobody's).
            self._check_in_use(int(s))
            if self.slot_lengths[s] >= self.capacity:
                raise ValueError(f"slot {s} is full ({self.capacity} tokens)")
        tokens = np.zeros((self.num_slots, 1), np.int32)
        tokens[slots, 0] = last_tokens
        active = np.zeros((self.num_slots,), bool)
        active[slots] = True
        # A private copy: on CPU jnp.asarray may alias or transfer the host array asynchronously, and
        # slot_lengths is incremented in place below (seen by the runtime as off-by-one KV positions).
        meta = DecodeMeta(jnp.asarray(self.slot_lengths.copy()), jnp.asarray(active))
        hidden = self.decode_embed_step(self.embed_state, jnp.asarray(tokens))
        for layer in range(self.num_layers):
            step = self.decode_steps[self.layer_kind[layer]]
            # The cache is donated: rebind the result, never reuse the old buffer.
            self.decode_caches[layer], hidden = step(self.layer_states[layer], self.decode_caches[layer], hidden, meta)
        _, next_tokens = self.decode_head_step(
            self.embed_state,
            self.final_state,
            hidden,
            jnp.zeros((self.num_slots,), jnp.int32),
        )
        next_tokens = np.asarray(next_tokens)  # waits for the step
        self.slot_lengths[slots] += 1
        return next_tokens[slots]

    def slot_length(self, slot: int) -> int:
        """Tokens in the slot's cache (0 for an empty slot)."""
        self._check_slot(slot)
        return int(self.slot_lengths[slot])

    def slot_in_use(self, slot: int) -> bool:
        """Whether the slot holds a sequence (loaded by load_prompt_kv and not freed since)."""
        self._check_slot(slot)
        return bool(self._in_use[slot])

    def free_slot(self, slot: int) -> None:
        """Mark a slot empty (its rows are overwritten by the next load_prompt_kv); a no-op on an empty slot."""
        self._check_slot(slot)
        self.slot_lengths[slot] = 0
        self._in_use[slot] = False

    def read_kv(self, slot: int, start: int, num_tokens: int) -> np.ndarray:
        """Records [L, num_tokens, *record] of tokens [start, start + num_tokens) of `slot`."""
        self._check_in_use(slot)
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (start, num_tokens)):
            # 1.5 -> 1; True read token 1 (slot numbers refuse a bool already)
            raise ValueError(f"slot {slot}: start={start!r} and num_tokens={num_tokens!r} must be integers")
        if start < 0 or num_tokens < 0 or start + num_tokens > self.slot_lengths[slot]:
            raise ValueError(
                f"slot {slot}: tokens [{start}, {start + num_tokens}) outside its {self.slot_lengths[slot]} tokens"
            )
        return np.asarray(
            self._read_kv(
                tuple(self.decode_caches),
                jnp.int32(slot),
                jnp.int32(start),
                int(num_tokens),
            )
        )

    def read_full_block(self, slot: int, block_index: int, block_size: int) -> np.ndarray:
        """Full Block bytes uint8 [L, block_size, bpt] of block `block_index` of `slot` (for write-back)."""
        return self.layout.to_bytes(self.read_kv(slot, block_index * block_size, block_size))


def _rounding_options(dtype: str) -> dict | None:
    """XLA compiler options for the steps of a model in `dtype`: for a 16-bit float, no excess precision (each op's
    result rounded to the dtype, as the program states), so a computation's bits do not depend on how XLA splits it
    into programs (layerwise == one jit of the whole model). None for float32 (the option changes nothing there)."""
    return None if dtype in ("float32", "float64") else {"xla_allow_excess_precision": False}


def random_params(abstract: dict, seed: int) -> dict:
    """Host-side (NumPy) random init for a param tree of ShapeDtypeStructs, deterministic per seed.

    Kernels/embeddings ~ N(0, 1/fan_in); norm weights 1 + 0.1 N(0, 1); biases 0.1 N(0, 1). NumPy instead
    of the modules' jax initializers: compiling threefry for every param costs seconds on CPU."""
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    out = []
    for path, leaf in leaves:
        name = str(getattr(path[-1], "key", path[-1]))
        shape = tuple(leaf.shape)
        if name == "weight" and len(shape) == 1:
            arr = 1.0 + 0.1 * rng.standard_normal(shape)
        elif len(shape) == 1:
            arr = 0.1 * rng.standard_normal(shape)
        else:
            fan_in = shape[-1] if name in ("embedding", "gate_weight") else shape[-2]
            arr = rng.standard_normal(shape) / np.sqrt(fan_in)
        out.append(jnp.asarray(arr, leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def _check_param_shapes(expected: dict, given: dict, path: tuple = ()) -> None:
    """Every expected param present with its shape; an error names the first mismatch."""
    for k, v in expected.items():
        name = "/".join(map(str, path + (k,)))
        if k not in given and str(k) not in given:
            raise ValueError(f"params: missing {name}")
        g = given[k] if k in given else given[str(k)]
        if isinstance(v, dict):
            if not isinstance(g, dict):
                raise TypeError(f"params: {name} should be a subtree, got {type(g).__name__}")
            _check_param_shapes(v, g, path + (k,))
        elif tuple(np.shape(g)) != tuple(v.shape):
            raise ValueError(f"params: {name} has shape {tuple(np.shape(g))}, expected {tuple(v.shape)}")
        else:
            # An int / bool / complex leaf (a quantized tensor, a mask) was cast to the config dtype silently; the HF
            # import and restore_params refuse such a tensor, naming it
            dtype = getattr(g, "dtype", None)  # (never `or`: a numpy dtype is falsy, len() 0)
            dtype = np.dtype(np.asarray(g).dtype if dtype is None else dtype)
            if not jnp.issubdtype(dtype, jnp.floating):
                raise ValueError(f"params: {name} has dtype {dtype}; expected a float array (cast to {v.dtype})")
    known = {str(k) for k in expected}
    extra = sorted(str(k) for k in given if str(k) not in known)
    if extra:  # e.g. params of a deeper model, or an lm_head for a tied config (flax named only the key)
        name = "/".join(map(str, path + (extra[0],)))
        raise ValueError(f"params: {name} is not a param of this config's model ({len(extra)} unexpected key(s))")


def _check_cast_finite(given: dict, cast: dict, path: tuple = ()) -> None:
    """Every param is finite once cast to the config's dtype: float32 weights beyond float16's range became inf
    silently (and every logit NaN), as did NaN weights; the HF import refuses both, naming the tensor. Params
    given in the config's dtype are scanned too: they were taken as they were (NaN weights saved by save_params,
    whose checksums match, now refused by restore_params itself), while the same weights in another dtype were
    refused."""
    for k, c in cast.items():
        g = given[k] if k in given else given[str(k)]  # (structure checked by _check_param_shapes)
        if isinstance(c, dict):
            _check_cast_finite(g, c, path + (k,))
            continue
        if bool(jnp.isfinite(c).all()):
            continue
        src = getattr(g, "dtype", None)
        src = np.dtype(np.asarray(g).dtype if src is None else src)
        name = "/".join(map(str, path + (k,)))
        what = (
            f"values beyond {c.dtype}'s range (inf once cast from {src})"
            if np.isfinite(np.asarray(g)).all()
            else "non-finite values (NaN or inf)"
        )
        raise ValueError(f"params: {name} has {what}")


def _weights_digest(pure: dict) -> str:
    """A stable id of the weights: every tensor's path, shape, dtype and all of its bytes (XXH3-128, ~10 GB/s, so a
    1B-parameter fp32 model costs ~0.4 s once at load). Until 2026-12-03 it hashed only the first 1,024 values of each
    tensor, so weights that differ further in (e.g. only the embedding rows of added tokens) shared an id, and a
    store kept for one served its KV to the other."""
    h = hashlib.sha256()
    for path, leaf in sorted(
        jax.tree_util.tree_flatten_with_path(pure)[0],
        key=lambda kv: jax.tree_util.keystr(kv[0]),
    ):
        arr = np.ascontiguousarray(np.asarray(leaf))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(f"{arr.shape}{arr.dtype}".encode())
        h.update(xxhash.xxh3_128_digest(arr.reshape(-1).view(np.uint8)))
    return h.hexdigest()[:16]
