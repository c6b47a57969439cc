"""The engines' view of a model: `models.runner.ModelRunner` adapted to host-buffer KV bytes.

`ModelOps.prefill` feeds each layer's cached KV as Layer-Block bytes (views of a host-buffer area) and hands
back each layer's new KV as bytes `[m, bpt]`; `DecodeBatch` is one decode engine's fixed-capacity batch
cache (its own slots; the jitted steps and weights are shared with every other engine of the process, so
identical layers compile once per process). `reference_generate` is the single-process reference run:
full prefill of the whole prompt + greedy decode, no store, no transport.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from collections.abc import Callable, Sequence

import numpy as np

from models.kv import KVLayout


def is_checkpoint(name: str) -> bool:
    """A model given as a directory: a local HF checkpoint (config.json + *.safetensors), read by every node."""
    return os.path.isdir(name)


def model_config(name: str, dtype: str = "float32"):
    """The model's typed config in `dtype` (params, activations and KV; `RuntimeConfig.dtype`): a tiny config by name
    (`models.registry.tiny_config`: tiny_qwen2, tiny_llama, tiny_deepseek, tiny_deepseek_v2), or the config.json of a
    local HF checkpoint directory. KeyError naming what is wrong (an unknown name, a directory that is not a
    checkpoint, a path (with a / or a leading . or ~) that is no directory)."""
    from models.registry import TINY_CONFIGS, tiny_config

    if is_checkpoint(name):
        from models.checkpoint import load_hf_config

        try:
            return load_hf_config(name, dtype)
        except ValueError as e:  # (the directory once: "/x: no config.json" printed it twice)
            msg = str(e)
            for prefix in (f"{name}: ", f"{os.path.join(name, '')}"):
                msg = msg.removeprefix(prefix)
            raise KeyError(f"HF checkpoint directory {name!r}: {msg}") from None
    if os.sep in name or name.startswith((".", "~")):  # a path, not a tiny config's name: it was "unknown model"
        why = "is not a directory" if os.path.exists(name) else "no such directory"
        tilde = " (a leading ~ is not expanded: give the full path)" if name.startswith("~") else ""
        raise KeyError(
            f"model {name!r}: {why}{tilde}; a local HF checkpoint is a directory (config.json + *.safetensors)"
        )
    if name not in TINY_CONFIGS.names():
        raise KeyError(
            f"unknown model {name!r}; known: {', '.join(sorted(TINY_CONFIGS.names()))}, or a local HF checkpoint "
            "directory (config.json + *.safetensors)"
        )
    return tiny_config(name, dtype=dtype)


class PrefillTokens(np.ndarray):
    """`ModelOps.prefill`'s [B] int32 next tokens (an ndarray), with `device_busy`: the runner's
    `PrefillResult.device_busy`, perf_counter spans during which the device was still computing the batch while
    `cached_layer` or `h2d` ran (a caller timing waits in them counts their overlap as compute)."""

    device_busy: Sequence[tuple[float, float]] = ()


class ModelOps:
    """One process's model: weights and jitted steps, shared by its engines (thread-safe prefill)."""

    def __init__(
        self,
        name: str,
        seed: int = 0,
        min_token_bucket: int = 64,
        batch_invariant: bool = False,
        device=None,
        dtype: str = "float32",
    ):
        """`name`: a tiny config name (random weights from `seed`) or a local HF checkpoint directory (its
        weights; `seed` unused). A checkpoint that does not load raises ValueError naming the tensor or field.
        `batch_invariant`: run the model's batch-invariant steps (`ModelConfig.batch_invariant`). `device` (a
        `jax.Device`; None: JAX's default): where the weights are made and the steps run (`node.node_model_ops`:
        a node process's first engine's device, so no weights of it sit on a device none of its engines uses).
        `dtype`: the weights', activations' and KV's (`RuntimeConfig.dtype`; a checkpoint's weights cast to it)."""
        import jax

        from models.runner import ModelRunner

        self.name = name
        self.seed = seed
        params = None
        if is_checkpoint(name):
            from models.checkpoint import load_hf_checkpoint

            self.config, params = load_hf_checkpoint(name, dtype)
        else:
            self.config = model_config(name, dtype)
        if batch_invariant:
            self.config = dataclasses.replace(self.config, batch_invariant=True)
        # min_token_bucket 64: fewer (batch, tokens, cached) buckets -> fewer compiles per process; the padding
        # costs little on a tiny model. The prefill runner's own decode cache is never used: one tiny slot.
        with contextlib.nullcontext() if device is None else jax.default_device(device):
            self.runner = ModelRunner(
                self.config, params, seed=seed, num_slots=1, capacity=16, min_token_bucket=min_token_bucket
            )
        if device is not None:  # committed there (steps on uncommitted weights run on the default device)
            self.runner = self.runner.on_device(device)
        self.kv_layout: KVLayout = self.runner.layout
        self.fingerprint = self.runner.fingerprint()
        self.vocab_size = self.config.vocab_size
        self._precompiled: set = set()
        self.device = device  # None: JAX's default device (`on_device`: another)
        self._device_copies: dict = {}  # device -> these ops on it (`on_device`)

    def prefill(
        self,
        token_ids: Sequence[np.ndarray],
        cached: Sequence[int],
        cached_layer: Callable[[int], list],
        on_layer: Callable[[int, list], None],
        h2d: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Layerwise prefill of a batch. token_ids[i]: the tokens computed now ([m_i] int32) on top of cached[i]
        tokens whose KV `cached_layer(l)[i]` gives (uint8 [cached_i, bpt]); `on_layer(l, [uint8 [m_i, bpt]])`
        receives each layer's new KV. `h2d(nbytes)`, when given, is called inside each layer's load (one layer
        ahead of the compute) with the bytes of cached KV that layer copies into device memory, before the copy
        (the engine's CNIC pacer). Returns [B] int32 greedy next tokens (meaningful for a prompt's last chunk), with
        `device_busy` (`PrefillTokens`)."""
        from models.runner import PrefillRequest

        reqs = [PrefillRequest(np.asarray(t, np.int32), int(c)) for t, c in zip(token_ids, cached, strict=True)]
        to_bytes = self.kv_layout.to_bytes

        def provider(layer: int):
            return [kv if c else None for kv, c in zip(cached_layer(layer), cached, strict=True)]

        def callback(layer: int, miss_kv: list) -> None:
            on_layer(layer, [to_bytes(kv) for kv in miss_kv])

        # No lock: the layerwise prefill reads only the runner's immutable params and jitted steps, so PEs sharing
        # this process (engines_per_node > 1, the inprocess launcher) run side by side, and one waiting for its
        # CNIC or for a DE's layers does not hold the others up (a lock here did until 2026-12-03).
        res = self.runner.prefill_layerwise(
            reqs,
            provider if any(cached) else None,
            callback,
            h2d=None if h2d is None else (lambda _layer, nbytes: h2d(nbytes)),
        )
        tokens = res.next_tokens.view(PrefillTokens)
        tokens.device_busy = res.device_busy
        return tokens

    def precompile(self, max_batch: int, max_tokens: int, max_cached: int) -> int:
        """Compile the prefill step for every (batch, tokens, cached) bucket a PE can meet, before serving.

        The runner pads batch size, new tokens and cached length to power-of-two buckets; a bucket first met
        mid-run costs a compile (~1 s on this CPU) inside some turn's latency. Returns the buckets compiled.
        """
        from models.runner import bucket

        key = (max_batch, max_tokens, max_cached)
        if key in self._precompiled:
            return 0  # this process's jit caches already hold them (a LocalCluster session's later runs)
        self._precompiled.add(key)
        mb = self.runner.min_token_bucket
        bs = [1 << i for i in range(bucket(max_batch).bit_length())]
        ts = [t for t in (1 << i for i in range(bucket(max_tokens, mb).bit_length())) if t >= mb]
        cs = [0] + [c for c in (1 << i for i in range(bucket(max_cached, mb).bit_length())) if c >= mb]
        bpt = self.kv_layout.bytes_per_token_per_layer
        n = 0
        for b in bs:
            for t in ts:
                for c in cs:
                    kv = np.zeros((c, bpt), np.uint8)
                    ids = [np.zeros((t,), np.int32)] * b
                    self.prefill(ids, [c] * b, lambda layer, b=b, kv=kv: [kv] * b, lambda layer, new: None)
                    n += 1
        return n

    @classmethod
    def of_config(cls, cfg, device=None) -> ModelOps:
        """The model of a RuntimeConfig (`model`, `model_seed`, `batch_invariant`, `dtype`), on `device` (None: the
        default)."""
        return cls(cfg.model, cfg.model_seed, batch_invariant=cfg.batch_invariant, device=device, dtype=cfg.dtype)

    def on_device(self, device) -> ModelOps:
        """These ops with their weights, steps and decode caches on `device` (`ModelRunner.on_device`), compiled there
        on their own (`precompile`). One copy per device, kept: a node process that serves several runs places its
        weights and compiles once. The device its weights are on is these ops themselves (a second copy there
        doubled the weights of the default device's engine on a multi-device host)."""
        if device == self.device or (self.device is None and device == self.runner.weights_device):
            return self
        out = self._device_copies.get(device)
        if out is None:
            out = copy.copy(self)
            out.runner = self.runner.on_device(device)
            out._precompiled = set()
            out._device_copies = {}
            out.device = device
            self._device_copies[device] = out
        return out

    def serves(self, cfg) -> bool:
        """Whether these ops are `of_config(cfg)`'s: the same model, seed, numerics and dtype (a node process that
        serves several runs keeps its ops only then: a bfloat16 run after a float32 one kept the float32 model)."""
        mine = (self.name, self.seed, self.config.batch_invariant, self.config.dtype)
        return mine == (cfg.model, cfg.model_seed, cfg.batch_invariant, cfg.dtype)

    def new_decode_batch(self, num_slots: int, capacity: int) -> DecodeBatch:
        return DecodeBatch(self, num_slots, capacity)


class DecodeBatch:
    """One DE's device batch cache: `num_slots` requests of up to `capacity` tokens each."""

    def __init__(self, ops: ModelOps, num_slots: int, capacity: int):
        # A shallow copy shares weights and jitted steps; init_decode gives this copy its own cache arrays.
        self.runner = copy.copy(ops.runner)
        self.runner.init_decode(num_slots, capacity)
        self.layout = ops.kv_layout

    def load(self, slot: int, area: np.ndarray, prompt_tokens: int) -> None:
        """H2D of a prompt's KV (uint8 [L, P, bpt], the DE buffer area) into `slot` (the decode engine has
        paced these bytes on its CNIC before)."""
        self.runner.load_prompt_kv(slot, area[:, :prompt_tokens])

    def step(self, tokens: np.ndarray, lengths: np.ndarray, active: np.ndarray) -> np.ndarray:
        """One greedy decode step for the active slots; returns [N] int32 (inactive entries 0)."""
        slots = np.nonzero(active)[0]
        for s in slots:
            if self.runner.slot_length(int(s)) != lengths[s]:
                raise RuntimeError(
                    f"slot {s}: engine length {lengths[s]} != cache length {self.runner.slot_length(int(s))}"
                )
        out = np.zeros(tokens.shape, np.int32)
        out[slots] = self.decode(slots, tokens[slots])
        return out

    def decode(self, slots: np.ndarray, last_tokens: np.ndarray) -> np.ndarray:
        """One greedy decode step for `slots` given their last tokens -> [len(slots)] int32 next tokens."""
        return self.runner.decode_step(slots, last_tokens)

    def precompile(self, block_size: int) -> None:
        """Compile the prompt loads of every length bucket, one decode step and the block read-back."""
        from models.runner import bucket

        r = self.runner
        mb = r.min_token_bucket
        bpt = self.layout.bytes_per_token_per_layer
        p = mb
        while True:
            p = min(p, r.capacity)
            self.runner.free_slot(0)
            self.runner.load_prompt_kv(0, np.zeros((r.num_layers, p, bpt), np.uint8))
            if p >= r.capacity or bucket(p, mb) >= r.capacity:
                break
            p *= 2
        self.runner.free_slot(0)
        # A slot holds at most capacity - 1 tokens of KV before a step (prompt + generation <= max_seq_len + 1:
        # `driver.slot_tokens`), so a block fills in it only when block_size < capacity. block_size >= max_seq_len is
        # valid (no block ever fills on a DE) but a block_size-token prompt plus a step overflowed the slot: every DE
        # node failed at start ("slot 0 is full" / "prompt exceeds decode capacity").
        self.runner.load_prompt_kv(0, np.zeros((r.num_layers, max(1, min(block_size, r.capacity - 1)), bpt), np.uint8))
        self.decode(np.array([0]), np.array([0]))
        if block_size < r.capacity:
            self.read_block(0, 0, block_size)
        self.runner.free_slot(0)

    def read_block(self, slot: int, start: int, block_size: int) -> np.ndarray:
        """Full Block bytes uint8 [L, block_size, bpt] of tokens [start, start + block_size) (write-back)."""
        return self.runner.read_full_block(slot, start // block_size, block_size)

    def free(self, slot: int) -> None:
        self.runner.free_slot(slot)


def reference_generate(
    ops: ModelOps,
    prompts_and_gens: Sequence[tuple[np.ndarray, int]],
    capacity: int,
    decode_slots: int = 1,
) -> list[np.ndarray]:
    """Reference: for each (prompt ids, gen), full prefill of the whole prompt (no cache) + greedy decode.

    `decode_slots`: the decode batch shape, as the runtime's DEs (`cluster.decode_slots`). Float rounding
    depends on the batch shape (not on the slot or the other slots' contents), and a near-tie in a model's
    argmax (an MoE's expert choice) can flip with it; with the same shape the tokens are bit-for-bit the
    runtime's.
    """
    batch = DecodeBatch(ops, decode_slots, capacity)
    out = []
    for prompt, gen in prompts_and_gens:
        logits, kv = ops.runner.full_prefill([np.asarray(prompt, np.int32)])
        tokens = [int(np.argmax(logits[0][-1]))]
        batch.runner.load_prompt_kv(0, kv[0])
        while len(tokens) < gen:
            tokens.append(int(batch.decode(np.array([0]), np.array([tokens[-1]]))[0]))
        batch.free(0)
        out.append(np.asarray(tokens, np.int32))
    return out


def reference_conversations(ops: ModelOps, book_factory, capacity: int, decode_slots: int = 1) -> dict:
    """Run every trajectory turn by turn with `reference_generate` (the next prompt uses these tokens).

    `book_factory()` returns a fresh `ConversationBook` over the same trajectories; `decode_slots` as in
    `reference_generate` (pass the runtime's `cluster.decode_slots`). Returns
    {(trajectory_id, turn_index): tokens}.
    """
    book = book_factory()
    while not book.done:
        due = book.pop_due(float("inf"))
        if not due:
            raise RuntimeError("reference run stalled: no turn due but the book is not done")
        toks = reference_generate(ops, [(t.prompt_ids, t.gen_tokens) for t in due], capacity, decode_slots)
        for t, g in zip(due, toks, strict=True):
            book.complete(t.request_id, g, 0.0)
    return dict(book.generated)


def cost_model_shape(ops: ModelOps):
    """The runtime model as a `schedulers.cost_model.ModelShape` (registered once as `cost_shape_name`), for the
    compute-quota batcher and the simulator's calibration. NotImplementedError for a model it cannot express
    (`model_cost_shape`)."""
    from schedulers.cost_model import MODEL_SHAPES

    name = cost_shape_name(ops.name, ops.config)
    if name in MODEL_SHAPES:
        return MODEL_SHAPES.get(name)
    shape = model_cost_shape(ops.name, ops.config)
    try:
        MODEL_SHAPES.add(name, shape)
    except ValueError:  # registered meanwhile by another thread
        return MODEL_SHAPES.get(name)
    return shape


def cost_shape_name(name: str, c) -> str:
    """The cost-model shape's name of model `name` with config `c`: "runtime:<name>", "runtime:<name>/<dtype>" for a
    dtype other than float32 (its weight and KV bytes differ: a bfloat16 run after a float32 one was priced at
    4 bytes a value)."""
    return f"runtime:{name}" + ("" if c.dtype == "float32" else f"/{c.dtype}")


def model_cost_shape(name: str, c):
    """The `ModelShape` `cost_shape_name(name, c)` of model config `c`, not registered (`driver.prepare` checks with
    it that the compute-quota batcher can price the model before anything starts). NotImplementedError for a model
    the cost model cannot express: a DeepSeek config with MoE on only some layers past the dense ones."""
    from schedulers.cost_model import ModelShape

    itemsize = c.kv_layout.np_dtype.itemsize
    common = dict(
        name=cost_shape_name(name, c),
        layers=c.num_layers,
        hidden=c.hidden_size,
        heads=c.num_attention_heads,
        intermediate=c.intermediate_size,
        vocab=c.vocab_size,
        tied_embeddings=c.tie_word_embeddings,
        weight_bytes=itemsize,
        kv_dtype_bytes=itemsize,
    )
    if hasattr(c, "num_key_value_heads"):  # dense GQA (Qwen2 / Llama)
        shape = ModelShape(
            kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim,
            qkv_bias=getattr(c, "qkv_bias", False),
            **common,
        )
    elif hasattr(c, "kv_lora_rank"):  # MLA + MoE (DeepSeek-V2 / V3)
        if c.n_routed_experts and c.moe_layer_freq != 1:  # (without routed experts every layer is dense)
            raise NotImplementedError(
                f"no cost-model shape for {name}: moe_layer_freq={c.moe_layer_freq} makes only the layers whose "
                f"index is a multiple of {c.moe_layer_freq} MoE past the first dense ones (the cost model has every "
                "layer past them MoE)"
            )
        shape = ModelShape(
            kv_heads=c.num_attention_heads,  # unused for MLA attention
            head_dim=c.v_head_dim,
            n_routed_experts=c.n_routed_experts,
            top_k=c.num_experts_per_tok,
            n_shared=c.n_shared_experts,
            moe_intermediate=c.moe_intermediate_size,
            first_k_dense=c.first_k_dense_replace,
            kv_lora_rank=c.kv_lora_rank,
            qk_rope_head_dim=c.qk_rope_head_dim,
            qk_nope_head_dim=c.qk_nope_head_dim,
            v_head_dim=c.v_head_dim,
            q_lora_rank=c.q_lora_rank or 0,
            **common,
        )
    else:
        raise NotImplementedError(f"no cost-model shape for {name} ({type(c).__name__})")
    if shape.kv_bytes_per_token != c.kv_bytes_per_token:
        raise ValueError(f"cost-model KV bytes {shape.kv_bytes_per_token} != the model's {c.kv_bytes_per_token}")
    return shape
