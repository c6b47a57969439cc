"""Model FLOPs of a prefill (matmul FLOPs = 2 x multiply-adds), for throughput and MFU reports.

Counts the useful work of the model as defined (MoE: only the k routed + shared experts per token, whatever
the dispatch computes; MLA prefill: the kv_b up-projection of every attended latent, as the expanded form
does; causal attention: each miss token attends to the cached prefix plus the miss tokens up to itself).
The LM head is counted for the last token of each request only (what prefill needs).
"""

from __future__ import annotations

from models.deepseek import DeepseekConfig
from models.qwen2 import Qwen2Config


def prefill_flops(config, miss_tokens: int, cached_tokens: int) -> float:
    """FLOPs to prefill one request: `miss_tokens` computed over `cached_tokens` of cached prefix."""
    m, c = miss_tokens, cached_tokens
    attended = m * c + m * (m + 1) / 2  # sum over miss tokens of keys attended
    h = config.hidden_size
    total = 0.0
    for layer in range(config.num_layers):
        if isinstance(config, Qwen2Config):
            hq, hkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
            proj = h * hq * d * 2 + h * hkv * d * 2  # q, o; k, v
            total += 2 * m * proj + 2 * 2 * hq * d * attended
            total += 2 * m * 3 * h * config.intermediate_size
        elif isinstance(config, DeepseekConfig):
            hq, r, dr = config.num_attention_heads, config.kv_lora_rank, config.qk_rope_head_dim
            nope, v = config.qk_nope_head_dim, config.v_head_dim
            qr = config.q_lora_rank
            q = h * hq * (nope + dr) if qr is None else h * qr + qr * hq * (nope + dr)
            total += 2 * m * (q + h * (r + dr) + hq * v * h)
            total += 2 * (c + m) * r * hq * (nope + v)  # kv_b over every attended latent (expanded form)
            total += 2 * attended * hq * (nope + dr + v)
            if config.is_moe_layer(layer):
                active = config.num_experts_per_tok + config.n_shared_experts
                total += 2 * m * (active * 3 * h * config.moe_intermediate_size + h * config.n_routed_experts)
            else:
                total += 2 * m * 3 * h * config.intermediate_size
        else:
            raise TypeError(f"no FLOP model for {type(config).__name__}")
    return total + 2 * h * config.vocab_size  # LM head, last token
