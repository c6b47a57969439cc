"""Rotary position embedding with the scaling variants the model families use.

- ``default``: inv_freq = theta^(-2i/d) (Qwen2, Llama-2, DeepSeek without scaling).
- ``llama3``: Llama-3.1 frequency-dependent scaling (factor, low/high_freq_factor, original context).
- ``yarn``: DeepSeek-V2/V3 YaRN (beta_fast/slow correction range, mscale on cos/sin and on the softmax).

Layouts: ``interleaved=False`` rotates the two halves of the head dim (HF ``rotate_half``, Qwen2/Llama);
``interleaved=True`` first de-interleaves pairs (x0,x1),(x2,x3).. into halves, as HF DeepSeek does, so the
output (and the cached k_pe) is in the half layout exactly like HF's modeling code.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from models.config import _check_field_types, float_fields_as_floats

_REQUIRED = {
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
}

# the scaling variants implemented here (`inv_freq`)
_KINDS = ("default", "llama3", "yarn")

_POSITIVE = (
    "factor",
    "original_max_position_embeddings",
    "low_freq_factor",
    "high_freq_factor",
    "beta_fast",
    "beta_slow",
)


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    dim: int  # rotary dims of one head
    theta: float = 10000.0
    kind: str = "default"  # "default" | "llama3" | "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 8192
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float = 1.0  # yarn
    mscale_all_dim: float = 0.0  # yarn
    interleaved: bool = False

    def __post_init__(self):
        float_fields_as_floats(self)
        # and the reverse: JSON's 8192.0 for the original context made an equal config (==) with another fingerprint
        # (json.dumps writes 8192.0), so KV blocks keyed by one were misses for the other
        v = self.original_max_position_embeddings
        if isinstance(v, float) and v.is_integer():
            object.__setattr__(self, "original_max_position_embeddings", int(v))
        # A RopeConfig built in Python skipped from_hf's checks: dim="16" was "not all arguments converted during
        # string formatting", theta="1e4" "must be real number, not str", and llama3 / yarn with factor=-1 (or
        # beta_fast <= 0, ...) ran with negative or NaN frequencies
        _check_field_types(self, "RopeConfig: ")
        if self.kind not in _KINDS:
            raise ValueError(f"rope_scaling type {self.kind!r} is not supported ({', '.join(_KINDS)})")
        if self.kind != "default":
            for k in _POSITIVE:
                if getattr(self, k) <= 0:
                    raise ValueError(f"RopeConfig: {k}={getattr(self, k)!r} must be > 0 with {self.kind} scaling")
        if self.dim % 2:
            raise ValueError(f"rotary dim must be even, got {self.dim}")
        # theta <= 0 gave NaN inverse frequencies (every logit NaN); yarn divides by log(theta)
        if not (math.isfinite(self.theta) and self.theta > 0):
            raise ValueError(f"rope theta must be a finite number > 0, got {self.theta!r}")
        if self.kind == "yarn" and self.theta <= 1:
            raise ValueError(f"rope theta must be > 1 for yarn scaling (it divides by log(theta)), got {self.theta!r}")

    @classmethod
    def from_hf(
        cls,
        dim: int,
        theta: float,
        rope_scaling: dict | None,
        interleaved: bool = False,
    ) -> RopeConfig:
        """Build from HF config fields `rope_theta` and `rope_scaling` (None, or a dict with `type`/`rope_type`)."""
        if not rope_scaling:
            return cls(dim=dim, theta=float(theta), interleaved=interleaved)
        if not isinstance(rope_scaling, dict):
            raise ValueError(f"rope_scaling must be an object, got {rope_scaling!r}")
        if "rope_type" not in rope_scaling and "type" not in rope_scaling:
            # {"factor": 8.0, ...} without a type computed unscaled RoPE, its fields ignored (HF: a KeyError)
            raise ValueError(f"rope_scaling {rope_scaling!r} has no 'rope_type' (or 'type'): which scaling is meant?")
        kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
        # the type first: longrope's short_factor / long_factor were named as unsupported fields, not the type
        if kind not in _KINDS:
            raise ValueError(f"rope_scaling type {kind!r} is not supported ({', '.join(_KINDS)})")
        fields = {f.name for f in dataclasses.fields(cls)} - {"dim", "theta", "kind", "interleaved"}
        # a key these variants do not read (yarn's attention_factor or truncate, say) would change the numbers
        # silently if dropped
        unknown = sorted(set(rope_scaling) - fields - {"type", "rope_type"})
        if unknown:
            raise ValueError(f"rope_scaling field(s) {unknown} are not supported; known: {sorted(fields)}")
        # Fields HF reads without a default (a KeyError there): a default here would change the numbers silently
        # (HF's yarn falls back to max_position_embeddings for the original context, DeepSeek's code to 4096).
        required = _REQUIRED.get(kind, ())
        missing = [k for k in required if k not in rope_scaling]
        if missing:
            raise ValueError(f"rope_scaling type {kind!r} needs field(s) {missing}")
        kw = {k: v for k, v in rope_scaling.items() if k in fields}
        for k, v in kw.items():  # "8" or null failed at the first trace inside inv_freq (a numpy TypeError)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"rope_scaling field {k!r} must be a finite number, got {v!r}")
            # each divides (ZeroDivisionError at the first trace) or is a log's argument (math domain error)
            if k in _POSITIVE and v <= 0:
                raise ValueError(f"rope_scaling field {k!r} must be > 0, got {v!r}")
        if kind == "yarn" and not theta > 1:
            raise ValueError(
                f"config.json: field 'rope_theta' must be > 1 with rope_scaling type 'yarn' (it divides by "
                f"log(rope_theta)), got {theta!r}"
            )
        return cls(dim=dim, theta=float(theta), kind=kind, interleaved=interleaved, **kw)


def _yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inv_freq(cfg: RopeConfig) -> np.ndarray:
    """[dim/2] float32 inverse frequencies after scaling (a trace-time constant), in HF's float32 arithmetic and
    order of operations (transformers' _compute_*_parameters, DeepSeek's remote code): float64 gave other bits
    (1 ulp), an angle 1e-3 rad off at 32k positions."""
    f32 = np.float32
    # HF: base ** (arange(0, dim, 2).float() / dim), base and dim as float32
    base = f32(cfg.theta) ** (np.arange(0, cfg.dim, 2).astype(f32) / f32(cfg.dim))
    freq = f32(1.0) / base
    if cfg.kind == "llama3":
        old = cfg.original_max_position_embeddings
        low_wavelen = f32(old / cfg.low_freq_factor)
        high_wavelen = f32(old / cfg.high_freq_factor)
        wavelen = f32(2 * math.pi) / freq
        scaled = np.where(wavelen > low_wavelen, freq / f32(cfg.factor), freq)
        smooth = (f32(old) / wavelen - f32(cfg.low_freq_factor)) / f32(cfg.high_freq_factor - cfg.low_freq_factor)
        smoothed = (f32(1) - smooth) * scaled / f32(cfg.factor) + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        freq = np.where(medium, smoothed, scaled)
    elif cfg.kind == "yarn":

        def correction_dim(num_rot: float) -> float:
            return (cfg.dim * math.log(cfg.original_max_position_embeddings / (num_rot * 2 * math.pi))) / (
                2 * math.log(cfg.theta)
            )

        low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
        high = min(math.ceil(correction_dim(cfg.beta_slow)), cfg.dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(cfg.dim // 2).astype(f32) - f32(low)) / f32(high - low), f32(0), f32(1))
        extra_mask = f32(1) - ramp
        # HF: interpolation 1 / (factor * base), not (1 / base) / factor
        interp = f32(1.0) / (f32(cfg.factor) * base)
        freq = interp * (f32(1) - extra_mask) + freq * extra_mask
    return freq.astype(f32)


def cos_sin_scale(cfg: RopeConfig) -> float:
    """Multiplier on cos/sin (YaRN's mscale ratio; 1 otherwise)."""
    if cfg.kind != "yarn":
        return 1.0
    return _yarn_get_mscale(cfg.factor, cfg.mscale) / _yarn_get_mscale(cfg.factor, cfg.mscale_all_dim)


def softmax_scale_factor(cfg: RopeConfig) -> float:
    """Extra factor on the attention softmax scale (DeepSeek YaRN: mscale(factor, mscale_all_dim)^2)."""
    if cfg.kind != "yarn" or not cfg.mscale_all_dim:
        return 1.0
    m = _yarn_get_mscale(cfg.factor, cfg.mscale_all_dim)
    return m * m


def apply_rope(x: jax.Array, positions: jax.Array, cfg: RopeConfig) -> jax.Array:
    """Rotate x [B, T, heads, dim] at integer positions [B, T] (traced int32)."""
    freq = jnp.asarray(inv_freq(cfg), jnp.float32)  # [dim/2]
    angles = positions.astype(jnp.float32)[..., None] * freq  # [B, T, dim/2]
    scale = cos_sin_scale(cfg)
    cos = (jnp.cos(angles) * scale)[:, :, None, :]  # [B, T, 1, dim/2]
    sin = (jnp.sin(angles) * scale)[:, :, None, :]
    dtype = x.dtype
    x = x.astype(jnp.float32)
    if cfg.interleaved:
        # HF DeepSeek: view(d/2, 2).transpose -> [x0, x2, ..., x1, x3, ...]
        x = jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)
    half = cfg.dim // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(dtype)
