"""KV byte layout: Layer Blocks and Full Blocks, and the (view-only) maps to/from the step arrays.

A model config fixes a **KV record**: the KV of one token in one layer, an array of the config's
``kv_dtype`` in C order (native little-endian):

- GQA (Qwen2/Llama): record shape ``(2, Hkv, Dh)``: K (after RoPE) then V, each head-major with Dh
  contiguous. ``kv_bytes_per_token_per_layer = 2 * Hkv * Dh * itemsize``.
- MLA (DeepSeek-V2/V3): record shape ``(R + Dr,)``: the normalised latent c_kv (kv_lora_rank R) then
  k_pe (qk_rope_head_dim Dr, after RoPE, HF half layout). ``(R + Dr) * itemsize`` bytes.

**Layer Block** (one layer, ``block_size`` tokens): ``uint8 [1, tokens, bpt]``, token t's record at byte
offset ``t * bpt``, ``bpt = kv_bytes_per_token_per_layer``.

**Full Block** (all layers of one block): ``uint8 [L, tokens, bpt]``, layer-major, so layer l is the
contiguous byte range ``[l * tokens * bpt, (l + 1) * tokens * bpt)`` and equals that layer's Layer Block
(``full_block[l:l+1]`` is a view). Storage holds Full Blocks; layerwise streaming moves Layer Blocks.

The prefill layer step consumes cached KV token-major, ``[B, C, *record]``, i.e. exactly these bytes
viewed as ``kv_dtype`` and reshaped: no conversion on the host hot path (the GQA transpose to head-major
happens on device inside the jitted step). Prefill/decode produce records in the same layout, so KV
written by either can be stored and fed back to any layer step; every map here is a view or a copy,
never an arithmetic conversion, and round trips are bit-exact.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class KVLayout:
    kind: str  # "gqa" | "mla"
    record_shape: tuple[int, ...]  # per token per layer
    kv_dtype: str  # numpy/ml_dtypes name, e.g. "float32", "bfloat16"
    num_layers: int

    @functools.cached_property
    def np_dtype(self) -> np.dtype:
        import ml_dtypes  # noqa: F401  (registers bfloat16 & co with numpy)

        return np.dtype(self.kv_dtype)

    @functools.cached_property
    def bytes_per_token_per_layer(self) -> int:
        return math.prod(self.record_shape) * self.np_dtype.itemsize

    def to_bytes(self, kv: np.ndarray) -> np.ndarray:
        """Records [..., *record] -> uint8 [..., bpt] (a view when kv is contiguous of kv_dtype)."""
        kv = np.asarray(kv)
        lead = kv.shape[: kv.ndim - len(self.record_shape)]
        if kv.shape[len(lead) :] != self.record_shape:
            raise ValueError(f"KV records have shape {kv.shape[len(lead) :]}, layout expects {self.record_shape}")
        if kv.dtype != self.np_dtype:
            raise ValueError(f"KV dtype {kv.dtype} != layout kv_dtype {self.kv_dtype} (no silent conversion)")
        return np.ascontiguousarray(kv).view(np.uint8).reshape(*lead, self.bytes_per_token_per_layer)

    def from_bytes(self, data: np.ndarray) -> np.ndarray:
        """uint8 [..., bpt] -> records [..., *record] of kv_dtype (a view)."""
        data = np.asarray(data)
        if data.dtype != np.uint8 or data.shape[-1:] != (self.bytes_per_token_per_layer,):
            raise ValueError(
                f"KV bytes must be uint8 [..., {self.bytes_per_token_per_layer}], got {data.dtype} {data.shape}"
            )
        data = np.ascontiguousarray(data)
        return data.view(self.np_dtype).reshape(*data.shape[:-1], *self.record_shape)

    def as_records(self, kv: np.ndarray) -> np.ndarray:
        """Accept records or bytes (uint8 [..., bpt]) and return records of kv_dtype (view when possible)."""
        kv = np.asarray(kv)
        if kv.dtype == np.uint8 and self.np_dtype != np.uint8:
            return self.from_bytes(kv)
        if kv.dtype != self.np_dtype:
            raise ValueError(f"KV dtype {kv.dtype} != layout kv_dtype {self.kv_dtype}")
        rec = self.record_shape
        if kv.shape[-len(rec) :] != rec:  # e.g. [c, Hkv, 2, Dh] would be silently reinterpreted by a reshape
            raise ValueError(f"KV records have shape {kv.shape}, layout expects [..., *{rec}]")
        return kv


def request_kv_to_full_blocks(
    layout: KVLayout, kv: np.ndarray, block_size: int, *, include_partial: bool = False
) -> list[np.ndarray]:
    """A request's KV of all layers, records [L, T, *record] (or [L, T, bpt] bytes), -> Full Blocks.

    Returns one uint8 [L, block_size, bpt] array per whole block (block i covers tokens
    [i*block_size, (i+1)*block_size)); with include_partial the tail block is returned shorter.
    """
    if block_size < 1:  # a negative step gave no blocks at all, silently
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    kv = layout.as_records(kv)
    if kv.ndim != 2 + len(layout.record_shape) or kv.shape[0] != layout.num_layers:
        raise ValueError(f"KV has shape {kv.shape}, expected [{layout.num_layers}, tokens, *{layout.record_shape}]")
    data = layout.to_bytes(kv)  # [L, T, bpt]
    n_tok = data.shape[1]
    blocks = []
    for start in range(0, n_tok, block_size):
        end = min(start + block_size, n_tok)
        if end - start < block_size and not include_partial:
            break
        # Copy: a block of tokens across all layers is strided in [L, T, bpt]; a Full Block is contiguous.
        blocks.append(np.ascontiguousarray(data[:, start:end]))
    return blocks


def full_blocks_to_request_kv(layout: KVLayout, blocks: Sequence[np.ndarray]) -> np.ndarray:
    """Full Blocks (uint8 [L, tokens, bpt] each) -> records [L, sum(tokens), *record]."""
    if not blocks:
        return np.zeros((layout.num_layers, 0, *layout.record_shape), layout.np_dtype)
    for i, b in enumerate(blocks):
        if b.ndim != 3 or b.shape[0] != layout.num_layers or b.shape[2] != layout.bytes_per_token_per_layer:
            raise ValueError(
                f"Full Block {i} has shape {b.shape}, expected [{layout.num_layers}, tokens, "
                f"{layout.bytes_per_token_per_layer}]"
            )
    data = blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=1)
    return layout.from_bytes(data)


def layer_block(full_block: np.ndarray, layer: int) -> np.ndarray:
    """Layer `layer` of a Full Block as a Layer Block uint8 [1, tokens, bpt] (a view, no copy)."""
    if not 0 <= layer < full_block.shape[0]:  # the slice would be an empty block, silently
        raise ValueError(f"layer {layer} out of range [0, {full_block.shape[0]}) of the Full Block")
    return full_block[layer : layer + 1]


def layer_blocks_to_records(layout: KVLayout, layer_blocks: Sequence[np.ndarray]) -> np.ndarray:
    """Layer Blocks of one layer (uint8 [1, tokens, bpt] each, in token order) -> records [T, *record]."""
    if not layer_blocks:
        return np.zeros((0, *layout.record_shape), layout.np_dtype)
    for i, b in enumerate(layer_blocks):
        # a Full Block would be read as L x tokens tokens, a block of another layout's bpt (say bfloat16 for a
        # float32 model) as tokens of this one
        if (np.ndim(b) == 3 and np.shape(b)[0] != 1) or np.shape(b)[-1:] != (layout.bytes_per_token_per_layer,):
            raise ValueError(
                f"Layer Block {i} has shape {np.shape(b)}, expected [1, tokens, {layout.bytes_per_token_per_layer}]"
            )
    data = np.concatenate(
        [np.asarray(b).reshape(-1, layout.bytes_per_token_per_layer) for b in layer_blocks],
        0,
    )
    return layout.from_bytes(data)
