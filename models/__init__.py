"""Flax NNX model zoo: dense GQA (Qwen2/Qwen2.5, Llama-3 style) and MoE + MLA (DeepSeek-V2/V3).

Entry points:
- ``models.registry.MODELS`` (keyed by HF architecture name), ``config_from_hf``, ``build_model``;
- ``models.runner.ModelRunner``: per-layer jitted prefill (layerwise, over cached KV) and decode;
- ``models.kv``: the byte layout of Layer Blocks / Full Blocks;
- ``models.checkpoint``: HF safetensors import, orbax save/restore;
- tiny configs: ``models.qwen2.tiny_qwen2/tiny_llama``, ``models.deepseek.tiny_deepseek/tiny_deepseek_v2``.

Submodules import jax; this package file stays light so `import models` costs nothing.
"""
