"""Byte layout of KV blocks, shared by storage, transports and the engines (model-agnostic, no jax).

A **Layer Block** is one layer's KV bytes of one block, `[1, block_tokens, bytes_per_token_per_layer]`;
a **Full Block** is all layers of that block, layer-major `[num_layers, block_tokens,
bytes_per_token_per_layer]`, so each Layer Block is one contiguous slice of the Full Block
(`layer_offset(l)` .. `layer_offset(l) + layer_block_nbytes`). Storage holds Full Blocks; layerwise
streaming moves Layer Blocks. The runtime builds a `BlockLayout` from a model config's numbers
(layers, block size, `kv_bytes_per_token_per_layer`) and a fingerprint naming the model and its KV format,
so blocks written by another model (or another KV format) are never taken for this one's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"BlockLayout.{name} must be a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """Shape of one Full Block in bytes: `[num_layers, block_tokens, bytes_per_token_per_layer]`."""

    num_layers: int  # L: layers with KV (a Full Block has one Layer Block per layer)
    block_tokens: int  # tokens per block (DESIGN.md block_size, default 64)
    bytes_per_token_per_layer: int  # the model's kv_bytes_per_token_per_layer (e.g. 656 for DeepSeek-V3 FP8)
    fingerprint: str  # model + KV format identity; stored in every block header, checked on read

    def __post_init__(self):
        for name in ("num_layers", "block_tokens", "bytes_per_token_per_layer"):
            _check_positive_int(name, getattr(self, name))
            # Python ints: sizes computed in a numpy int's width wrap (np.int32: a store's used bytes past 2 GiB)
            object.__setattr__(self, name, int(getattr(self, name)))
        if not isinstance(self.fingerprint, str) or not self.fingerprint:
            raise ValueError(f"BlockLayout.fingerprint must be a non-empty str, got {self.fingerprint!r}")

    @property
    def layer_block_nbytes(self) -> int:
        """Bytes of one Layer Block: block_tokens * bytes_per_token_per_layer."""
        return self.block_tokens * self.bytes_per_token_per_layer

    @property
    def full_block_nbytes(self) -> int:
        """Bytes of one Full Block: num_layers Layer Blocks back to back."""
        return self.num_layers * self.layer_block_nbytes

    @property
    def full_block_shape(self) -> tuple[int, int, int]:
        return (self.num_layers, self.block_tokens, self.bytes_per_token_per_layer)

    @property
    def layer_block_shape(self) -> tuple[int, int, int]:
        return (1, self.block_tokens, self.bytes_per_token_per_layer)

    def layer_offset(self, layer: int) -> int:
        """Byte offset of Layer Block `layer` inside a Full Block."""
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer!r} out of range for a BlockLayout of {self.num_layers} layers")
        return int(layer) * self.layer_block_nbytes

    def normalize_layers(self, layers: Iterable[int] | range | slice | int | None) -> list[int]:
        """Layer indices of a read/feed request: None = all layers; one int; a range, slice or list of ints."""
        if layers is None:
            return list(range(self.num_layers))
        if isinstance(layers, (int, np.integer)) and not isinstance(layers, bool):
            self.layer_offset(layers)
            return [int(layers)]
        if isinstance(layers, slice):
            out = list(range(self.num_layers))[layers]
            if not out:  # slice(2, 2) read nothing and reported a hit
                raise ValueError(f"layers {layers} names no layer of {self.num_layers}")
            return out
        if isinstance(layers, (str, bytes, bytearray, memoryview)) or not isinstance(layers, Iterable):
            # (b"\x01" was read as layer 1, "1" reported "layer '1' out of range", 1.0 "not iterable")
            raise TypeError(f"layers must be None, an int, a slice or an iterable of ints, got {layers!r}")
        out = []
        for layer in layers:
            self.layer_offset(layer)  # validates type and range
            out.append(int(layer))
        if not out:
            raise ValueError("layers must name at least one layer")
        return out

    def full_block_view(self, buf) -> np.ndarray:
        """A `[num_layers, block_tokens, bytes_per_token_per_layer]` uint8 view of a Full Block buffer."""
        if isinstance(buf, np.ndarray):
            if not buf.flags.c_contiguous:  # reshape would copy: writes through the "view" would be lost
                raise ValueError("a Full Block view needs a C-contiguous buffer, got a strided array")
            arr = buf.reshape(-1).view(np.uint8)
        else:
            arr = np.frombuffer(buf, dtype=np.uint8)
        if arr.nbytes != self.full_block_nbytes:
            raise ValueError(f"buffer holds {arr.nbytes} bytes; a Full Block of {self} is {self.full_block_nbytes}")
        return arr.reshape(self.full_block_shape)
