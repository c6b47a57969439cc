"""Model families keyed by HF architecture name: ``MODELS.get("Qwen2ForCausalLM")`` -> ModelFamily."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from dualpath_jax.registry import Registry
from models import deepseek, qwen2


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    config_cls: type  # typed config dataclass with from_hf(dict, dtype)
    model_cls: type  # nnx.Module, model_cls(config, rngs)
    hf_tensor_map: Callable  # config -> {nnx param path: (HF name(s), transform)}


MODELS: Registry[ModelFamily] = Registry("model architecture")
MODELS.add(
    "Qwen2ForCausalLM",
    ModelFamily(qwen2.Qwen2Config, qwen2.Qwen2ForCausalLM, qwen2.hf_tensor_map),
)
MODELS.add(
    "LlamaForCausalLM",
    ModelFamily(qwen2.Qwen2Config, qwen2.LlamaForCausalLM, qwen2.hf_tensor_map),
)
MODELS.add(
    "DeepseekV2ForCausalLM",
    ModelFamily(deepseek.DeepseekConfig, deepseek.DeepseekV2ForCausalLM, deepseek.hf_tensor_map),
)
MODELS.add(
    "DeepseekV3ForCausalLM",
    ModelFamily(deepseek.DeepseekConfig, deepseek.DeepseekV3ForCausalLM, deepseek.hf_tensor_map),
)


# Tiny configs by name (CPU tests, demo, runtime defaults): name -> zero-argument factory.
TINY_CONFIGS: Registry[Callable] = Registry("tiny model config")
TINY_CONFIGS.add("tiny_qwen2", qwen2.tiny_qwen2)
TINY_CONFIGS.add("tiny_llama", qwen2.tiny_llama)
TINY_CONFIGS.add("tiny_deepseek", deepseek.tiny_deepseek)
TINY_CONFIGS.add("tiny_deepseek_v2", deepseek.tiny_deepseek_v2)


def tiny_config(name: str, **overrides):
    """A tiny typed config by name (e.g. "tiny_qwen2", dtype="bfloat16"); unknown names list the known ones."""
    return TINY_CONFIGS.get(name)(**overrides)


def family(config_or_arch) -> ModelFamily:
    arch = config_or_arch if isinstance(config_or_arch, str) else config_or_arch.architecture
    return MODELS.get(arch)


def config_from_hf(d: dict, dtype: str = "float32"):
    """HF config.json dict -> typed config of the right family (unknown architecture -> error naming it)."""
    if not isinstance(d, dict):
        raise ValueError(f"config.json: expected a JSON object, got {type(d).__name__}")
    archs = d.get("architectures")
    if not archs:
        raise ValueError("config.json: missing field 'architectures'")
    if not isinstance(archs, list) or not isinstance(archs[0], str):  # a bare string would give archs[0] = "Q"
        raise ValueError(f"config.json: 'architectures' must be a list of names, got {archs!r}")
    try:
        fam = MODELS.get(archs[0])
    except KeyError as e:
        raise ValueError(f"config.json: architectures[0]={archs[0]!r}: {e.args[0]}") from None
    return fam.config_cls.from_hf(d, dtype=dtype)


def build_model(config, seed: int = 0):
    """Random-init NNX model for `config`."""
    from flax import nnx

    return family(config).model_cls(config, nnx.Rngs(seed))


def weight_bytes(config) -> int:
    """Bytes of `config`'s weights, every parameter at its dtype, from shapes alone (nothing is allocated): what one
    copy of the model takes in device memory (the runtime's checks of an accelerator's memory)."""
    import jax
    from flax import nnx

    abstract = nnx.eval_shape(lambda: family(config).model_cls(config, nnx.Rngs(0)))
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))))
