"""Typed model config base shared by the families (Qwen2/Llama in qwen2.py, DeepSeek in deepseek.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import numpy as np

from models.kv import KVLayout

# Version of the numerics that turn a config's weights and tokens into KV bytes; part of every fingerprint, so a KV
# store written by code of other numerics is refused at open rather than served as this code's KV (e.g. 98e5330's bf16
# rounding moved tiny_deepseek's KV by 8% under one fingerprint). Bump it in any commit that changes the KV bytes a
# config computes (tests/test_fix29_compatstore_kv.py pins them on the hosts it knows). History: 1 until 9bb3609 (RoPE
# frequencies in HF's float32 arithmetic), 2 until 55ed079 (float32 dots at precision float32: no TF32 on GPUs), 3 until
# 98e5330 (bf16/fp16 steps without excess precision), 4 since (1-3 are notional: fingerprints had no `n` part then).
KV_NUMERICS = 4


def hf_field(d: dict, key: str, where: str = "config.json") -> int:
    """A required HF config field (a size or a count: an integer >= 1), or an error naming it."""
    if key not in d:
        raise ValueError(f"{where}: missing required field {key!r}")
    v = d[key]
    # "32", 32.5 or null failed deep in the model build; num_hidden_layers=-1 built a model without layers
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{where}: field {key!r} must be an integer >= 1, got {v!r}")
    return v


def hf_int(d: dict, key: str, default, low: int = 0, where: str = "config.json"):
    """An optional integer HF config field: `default` when absent or null, else an integer >= `low`."""
    v = d.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or v < low:  # "2" or 2.5 failed deep in the model build
        raise ValueError(f"{where}: field {key!r} must be an integer >= {low}, got {v!r}")
    return v


def hf_float(d: dict, key: str, default: float, where: str = "config.json", *, above: float | None = None) -> float:
    """An optional real HF config field (`default` when absent or null): a finite number, and `> above` when given
    (rope_theta <= 0 or rms_norm_eps <= 0 loaded, and every logit was NaN)."""
    v = d.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{where}: field {key!r} must be a finite number, got {v!r}")
    if above is not None and not v > above:
        raise ValueError(f"{where}: field {key!r} must be > {above:g}, got {v!r}")
    return float(v)


def hf_bool(d: dict, key: str, default: bool = False, where: str = "config.json") -> bool:
    """An optional boolean HF config field (`default` when absent or null): JSON true or false."""
    v = d.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):  # bool("false") is True: a tied head or a bias switched on silently
        raise ValueError(f"{where}: field {key!r} must be true or false, got {v!r}")
    return v


def hf_rope(d: dict, where: str = "config.json") -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) of an HF config. transformers >= 5 writes both into `rope_parameters`
    ({"rope_theta": .., "rope_type": .., the scaling's fields}) with no top-level rope_theta: while only the
    legacy fields were read, such a config got theta 10000 and unscaled RoPE, silently."""
    params = d.get("rope_parameters")
    theta = hf_float(d, "rope_theta", 10000.0, where, above=0)
    if params is None:
        return theta, d.get("rope_scaling")
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"{where}: rope_parameters must be one object of numbers (per layer type: not supported)")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(
            f"{where}: rope_parameters partial_rotary_factor={params['partial_rotary_factor']!r} is not supported (1.0)"
        )
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if scaling in ({}, {"rope_type": "default"}, {"type": "default"}):
        scaling = None
    new_theta = hf_float(params, "rope_theta", theta, f"{where}: rope_parameters", above=0)
    # both spellings: they must agree (which one HF reads depends on its version)
    # (the legacy `type` and the new `rope_type` name one field: {"type": "yarn"} beside {"rope_type": "yarn"} agree)
    if ("rope_theta" in d and d["rope_theta"] is not None and new_theta != theta) or (
        d.get("rope_scaling") and _rope_type_named(d["rope_scaling"]) != _rope_type_named(scaling)
    ):
        raise ValueError(f"{where}: rope_parameters {params!r} and rope_theta / rope_scaling disagree")
    return new_theta, scaling


def _rope_type_named(scaling):
    """A rope scaling dict with its legacy `type` key spelled `rope_type` (for comparing the two spellings)."""
    if not isinstance(scaling, dict) or "type" not in scaling or "rope_type" in scaling:
        return scaling
    return {("rope_type" if k == "type" else k): v for k, v in scaling.items()}


#: HF `hidden_act` names of SiLU, x * sigmoid(x) (transformers' ACT2FN: "silu" and "swish" are both nn.SiLU).
_SILU_NAMES = ("silu", "swish")


def check_hf_unsupported(d: dict, where: str = "config.json") -> None:
    """Refuse HF config settings these models do not implement, which would otherwise be ignored and change the
    numbers silently: an activation other than SiLU, sliding-window attention, partial RoPE (a top-level
    partial_rotary_factor other than 1). HF's "swish" is SiLU by another name (transformers' ACT2FN maps both to
    nn.SiLU): it is accepted, and nothing of the config records which spelling was read, so its fingerprint (the
    stored KV's key) is that of the "silu" config. A `quantization_config` is refused: the tensors are read as stored
    and cast to the config dtype, so a quantized checkpoint's scales would be ignored."""
    quant = d.get("quantization_config")
    if quant:  # (fp32 tensors beside an "fp8" quantization_config loaded silently)
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        raise ValueError(
            f"{where}: quantization_config (quant_method={method!r}) is not supported: the weights are read as "
            "stored and cast to the config dtype, so a quantized checkpoint's scales would be ignored; give a "
            "dequantized checkpoint (float tensors, no quantization_config)"
        )
    act = d.get("hidden_act", "silu")
    if act not in _SILU_NAMES:
        raise ValueError(f"{where}: hidden_act={act!r} is not supported (silu)")
    if hf_bool(d, "use_sliding_window", False, where):
        raise ValueError(f"{where}: use_sliding_window=true is not supported (full attention only)")
    # transformers' RoPE init reads a top-level partial_rotary_factor (rotary dims = head_dim x factor); it was
    # ignored here and every dim rotated, silently (the rope_parameters spelling was already refused)
    factor = hf_float(d, "partial_rotary_factor", 1.0, where)
    if factor != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor={d['partial_rotary_factor']!r} is not supported (1.0)")


def float_fields_as_floats(obj) -> None:
    """A frozen dataclass's int values of `float` fields, stored as floats: JSON's `"factor": 40` and Python's 40.0
    made equal configs (==) with different fingerprints (json.dumps writes 40 vs 40.0), so KV blocks keyed by one
    were misses for the other. NumPy scalars become Python numbers for the same reason (json.dumps wrote
    np.int64(4) / np.float32(2.5) / np.bool_(True) as the strings "4", "2.5", "True")."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, np.generic) and isinstance(v, (np.bool_, np.integer, np.floating)):
            v = v.item()
            object.__setattr__(obj, f.name, v)
        if f.type == "float" and isinstance(v, int) and not isinstance(v, bool):
            object.__setattr__(obj, f.name, float(v))


def _check_field_types(obj, where: str) -> None:
    """Each bool / int / float / str field of a frozen dataclass of its annotated type (floats finite)."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if f.type == "bool" and not isinstance(v, bool):
            raise ValueError(f"{where}{f.name}={v!r} must be True or False")
        if f.type == "int" and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValueError(f"{where}{f.name}={v!r} must be an integer")
        if f.type == "float" and not (isinstance(v, float) and math.isfinite(v)):
            raise ValueError(f"{where}{f.name}={v!r} must be a finite number")
        if f.type == "str" and not isinstance(v, str):
            raise ValueError(f"{where}{f.name}={v!r} must be a string")


_DTYPES = ("float32", "bfloat16", "float16")


def _check_dtype(dtype) -> None:
    """The config dtype is that of params, activations and KV records: a float type JAX computes in as named.

    "float64" gave float32 arrays (JAX without x64) under a layout of 8-byte records; "int8" failed in the
    random init; "bf16" deep in numpy."""
    if dtype in _DTYPES:
        return
    if dtype == "float64":
        import jax

        if jax.config.jax_enable_x64:
            return
        raise ValueError("dtype='float64' needs jax_enable_x64 (JAX would compute and return float32)")
    raise ValueError(f"dtype={dtype!r} is not supported ({', '.join(_DTYPES)})")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    architecture: str  # HF architecture name, the registry key
    vocab_size: int
    hidden_size: int
    num_layers: int
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    dtype: str = "float32"  # params, activations and KV ("float32" on CPU, "bfloat16" on GPU)
    max_position_embeddings: int = 4096
    # Compute every token at fixed shapes, so its bits do not depend on its batch, chunking or on prefill vs
    # decode (models/layers/invariant.py): greedy tokens identical whatever the policy, even at near-ties.
    batch_invariant: bool = False

    # Execution choices that change neither the weights' meaning nor the KV bytes' meaning.
    _NOT_IN_FINGERPRINT = ("moe_dispatch", "mla_prefill", "batch_invariant")
    # Integer fields that must be >= 1 / >= 0 (subclasses add theirs), as from_hf requires of config.json.
    _SIZES = ("vocab_size", "hidden_size", "num_layers", "max_position_embeddings")
    _COUNTS = ()

    def __post_init__(self):
        _check_dtype(self.dtype)
        float_fields_as_floats(self)
        # A config built in Python (tiny_config(name, **overrides)) skipped from_hf's checks: num_layers=0 failed at
        # the first prefill ("Need at least one array to stack"), num_key_value_heads=0 or kv_lora_rank=0 as a bare
        # ZeroDivisionError, and rms_norm_eps <= 0 gave NaN logits without an error.
        for names, low in ((self._SIZES, 1), (self._COUNTS, 0)):
            for name in names:
                v = getattr(self, name)
                if isinstance(v, bool) or not isinstance(v, int) or v < low:
                    raise ValueError(f"{type(self).__name__}: {name}={v!r} must be an integer >= {low}")
        if not (isinstance(self.rms_norm_eps, float) and math.isfinite(self.rms_norm_eps) and self.rms_norm_eps > 0):
            raise ValueError(f"{type(self).__name__}: rms_norm_eps={self.rms_norm_eps!r} must be a finite number > 0")
        self._check_types()
        self._check_architecture()

    def _check_types(self) -> None:
        """Every field of its annotated type. A config built in Python skipped from_hf's checks: qkv_bias="false"
        failed as a bare AssertionError at the first prefill, tie_word_embeddings="false" tied the head silently
        (a truthy string), num_experts_per_tok=2.0 failed inside jax.lax.top_k, routed_scaling_factor=nan gave NaN
        logits, and rope={...} an AttributeError at the model build. (A RopeConfig checks its own fields when built.)"""
        from models.layers.rope import RopeConfig  # (rope.py imports this module)

        name = type(self).__name__
        _check_field_types(self, f"{name}: ")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type == "RopeConfig" and not isinstance(v, RopeConfig):
                raise ValueError(
                    f"{name}: rope={v!r} must be a RopeConfig (models.layers.rope; from an HF dict: RopeConfig.from_hf)"
                )

    def _check_architecture(self) -> None:
        """The architecture is registered for this config class (another family's name failed at the model build,
        e.g. Qwen2Config with "DeepseekV3ForCausalLM": no attribute 'is_moe_layer')."""
        from models.registry import MODELS  # (the registry imports the families, which import this module)

        ours = [a for a in MODELS if MODELS.get(a).config_cls is type(self)]
        if self.architecture not in ours:
            raise ValueError(
                f"{type(self).__name__}: architecture={self.architecture!r} is not one of {', '.join(ours)} "
                f"(models.registry.MODELS)"
            )

    # Subclasses: the per-token per-layer KV record shape and its kind.
    def _kv_record(self) -> tuple[str, tuple[int, ...]]:
        raise NotImplementedError

    @property
    def kv_layout(self) -> KVLayout:
        kind, shape = self._kv_record()
        return KVLayout(
            kind=kind,
            record_shape=shape,
            kv_dtype=self.dtype,
            num_layers=self.num_layers,
        )

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        return self.kv_layout.bytes_per_token_per_layer

    @property
    def kv_bytes_per_token(self) -> int:
        return self.kv_bytes_per_token_per_layer * self.num_layers

    def fingerprint(self, kv_numerics: bool = True) -> str:
        """Stable id of the model architecture and KV format: KV blocks are only valid for a reader with an
        equal fingerprint (weights are identified separately, see ModelRunner.fingerprint).

        `arch/L<layers>/<kind>[<record shape>]/<dtype>/n<KV_NUMERICS>/<config digest>`; `kv_numerics=False` leaves
        the `n` part out: the id of the config alone (what a weights checkpoint is saved for, which another KV
        numerics does not change; fingerprints before KV_NUMERICS had this form)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in self._NOT_IN_FINGERPRINT}
        blob = json.dumps(fields, sort_keys=True, default=str).encode()
        layout = self.kv_layout
        shape = "x".join(map(str, layout.record_shape))
        numerics = f"n{KV_NUMERICS}/" if kv_numerics else ""
        return (
            f"{self.architecture}/L{self.num_layers}/{layout.kind}[{shape}]/{self.dtype}/{numerics}"
            f"{hashlib.sha256(blob).hexdigest()[:16]}"
        )
