"""Attention: GQA (Qwen2/Llama) and MLA (DeepSeek-V2/V3), each with a prefill and a decode path.

KV records (one token, one layer; the unit of the byte layout in `models/kv.py`):
- GQA: ``[2, Hkv, Dh]`` = (K after RoPE, V), so a request's layer KV is ``[tokens, 2, Hkv, Dh]``.
- MLA: ``[kv_lora_rank + qk_rope_head_dim]`` = (normalised latent c_kv, k_pe after RoPE), the compressed
  cache of DeepSeek: one vector per token shared by all heads.

Prefill (`prefill`): the miss tokens of a batch attend to their own cached prefix (token-major, as the
bytes arrive: ``[B, C, *record]``, valid up to ``meta.cached_lens``) plus themselves causally; returns the
new tokens' records ``[B, T, *record]``.
Decode (`decode`): one token per slot over a fixed-capacity cache. GQA keeps it head-major
``[N, Hkv, S, Dh]`` (2-7x faster than token-major on XLA:CPU); MLA keeps the latent ``[N, S, R + Dr]``
and uses absorbed attention (q folded into the latent space, W_UV applied after), which avoids
expanding S latents to per-head keys/values every step. MLA prefill picks, per bucket (static T, C), the
form with fewer multiply-adds: absorbed for short appends over long cached prefixes, expanded otherwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import invariant as inv
from models.layers.rmsnorm import RMSNorm
from models.layers.rope import RopeConfig, apply_rope, softmax_scale_factor
from models.meta import DecodeMeta, PrefillMeta

_NEG = -1e30  # finite "minus infinity": a fully masked padding row stays finite (no NaN)


def prefill_mask(meta: PrefillMeta, num_cached: int, num_new: int) -> jax.Array:
    """[B, T, C + T] bool: cached key j valid if j < cached_len; new key u valid if u <= t and u < miss_len."""
    j = jnp.arange(num_cached)
    cached = jnp.broadcast_to(
        (j[None, :] < meta.cached_lens[:, None])[:, None, :],
        (meta.cached_lens.shape[0], num_new, num_cached),
    )
    t = jnp.arange(num_new)
    causal = (t[None, :] <= t[:, None])[None] & (t[None, None, :] < meta.miss_lens[:, None, None])
    return jnp.concatenate([cached, causal], axis=-1)


def decode_mask(meta: DecodeMeta, capacity: int) -> jax.Array:
    """[N, S] bool: key s valid if s <= length (the token written this step included)."""
    return jnp.arange(capacity)[None, :] <= meta.lengths[:, None]


def _softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    scores = jnp.where(mask, scores, _NEG)
    return jax.nn.softmax(scores, axis=-1)


def _write_position(meta: DecodeMeta, capacity: int) -> jax.Array:
    # Inactive slots write out of bounds -> dropped by the scatter (their cache rows stay untouched).
    return jnp.where(meta.active, meta.lengths, capacity)


class GQAAttention(nnx.Module):
    """Grouped-query attention; HF names q_proj/k_proj/v_proj (bias for Qwen2) and o_proj."""

    def __init__(
        self,
        hidden: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        qkv_bias: bool,
        rope: RopeConfig,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
        o_bias: bool = False,
    ):
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads={num_heads} not a multiple of num_key_value_heads={num_kv_heads}")
        if rope.dim != head_dim:  # failed at the first trace as a broadcast error inside apply_rope
            raise ValueError(f"rope dim {rope.dim} != head_dim {head_dim} (GQA rotates the whole head)")
        self.num_heads, self.num_kv_heads, self.head_dim = (
            num_heads,
            num_kv_heads,
            head_dim,
        )
        self.rope = rope
        kw = {"dtype": dtype, "param_dtype": dtype, "rngs": rngs}
        self.q_proj = nnx.Linear(hidden, num_heads * head_dim, use_bias=qkv_bias, **kw)
        self.k_proj = nnx.Linear(hidden, num_kv_heads * head_dim, use_bias=qkv_bias, **kw)
        self.v_proj = nnx.Linear(hidden, num_kv_heads * head_dim, use_bias=qkv_bias, **kw)
        self.o_proj = nnx.Linear(num_heads * head_dim, hidden, use_bias=o_bias, **kw)

    def _qkv(self, x: jax.Array, positions: jax.Array):
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        return (
            apply_rope(q, positions, self.rope),
            apply_rope(k, positions, self.rope),
            v,
        )

    def prefill(self, kv_cached: jax.Array, x: jax.Array, meta: PrefillMeta) -> tuple[jax.Array, jax.Array]:
        """kv_cached [B, C, 2, Hkv, Dh], x [B, T, H] -> (kv_new [B, T, 2, Hkv, Dh], out [B, T, H])."""
        b, t, _ = x.shape
        c = kv_cached.shape[1]
        hkv, g, d = (
            self.num_kv_heads,
            self.num_heads // self.num_kv_heads,
            self.head_dim,
        )
        q, k, v = self._qkv(x, meta.positions(t))
        kv_new = meta.zero_padding(jnp.stack([k, v], axis=2).astype(kv_cached.dtype))  # [B, T, 2, Hkv, Dh]
        kv_all = jnp.concatenate([kv_cached, kv_new], axis=1)  # [B, C+T, 2, Hkv, Dh]
        keys = jnp.transpose(kv_all[:, :, 0], (0, 2, 1, 3))  # [B, Hkv, S, Dh]
        vals = jnp.transpose(kv_all[:, :, 1], (0, 2, 1, 3))
        q = jnp.transpose(q.reshape(b, t, hkv, g, d), (0, 2, 3, 1, 4))  # [B, Hkv, G, T, Dh]
        scores = jnp.einsum("bkgtd,bksd->bkgts", q, keys, preferred_element_type=jnp.float32) * d**-0.5
        probs = _softmax(scores, prefill_mask(meta, c, t)[:, None, None])
        out = jnp.einsum("bkgts,bksd->bkgtd", probs.astype(vals.dtype), vals)  # [B, Hkv, G, T, Dh]
        out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, self.num_heads * d)
        return kv_new, self.o_proj(out)

    def decode(self, cache: tuple[jax.Array, jax.Array], x: jax.Array, meta: DecodeMeta):
        """cache (K, V) each [N, Hkv, S, Dh], x [N, 1, H] -> (cache, out [N, 1, H])."""
        k_cache, v_cache = cache
        n, s = k_cache.shape[0], k_cache.shape[2]
        hkv, g, d = (
            self.num_kv_heads,
            self.num_heads // self.num_kv_heads,
            self.head_dim,
        )
        q, k, v = self._qkv(x, meta.positions())
        k_cache, v_cache = self.write_cache(cache, jnp.stack([k[:, 0], v[:, 0]], axis=1), meta)
        q = q.reshape(n, hkv, g, d)
        scores = jnp.einsum("nkgd,nksd->nkgs", q, k_cache, preferred_element_type=jnp.float32) * d**-0.5
        probs = _softmax(scores, decode_mask(meta, s)[:, None, None])
        out = jnp.einsum("nkgs,nksd->nkgd", probs.astype(v_cache.dtype), v_cache).reshape(n, 1, self.num_heads * d)
        return (k_cache, v_cache), self.o_proj(out)

    # ---- batch-invariant path (models/layers/invariant.py): rows in, rows out ----
    def project(self, x: jax.Array, pos: jax.Array):
        """Rows x [R, H], positions [R] -> (q [R, Hq, Dh], KV records [R, 2, Hkv, Dh])."""
        q, k, v = self._qkv(x[:, None], pos[:, None])
        return q[:, 0], jnp.stack([k[:, 0], v[:, 0]], axis=1)

    def prefill_keys(self, kv_cached: jax.Array, kv_new: jax.Array, meta: PrefillMeta):
        """Cached [B, C, 2, Hkv, Dh] + new [B, T, ...] -> (K, V) [B, Hkv, S, Dh] at absolute positions."""
        kv = inv.absolute_keys(kv_cached, kv_new, meta.cached_lens)
        return jnp.transpose(kv[:, :, 0], (0, 2, 1, 3)), jnp.transpose(kv[:, :, 1], (0, 2, 1, 3))

    def write_cache(self, cache, records: jax.Array, meta: DecodeMeta):
        """Decode: the step's records [N, 2, Hkv, Dh] into the head-major cache at each slot's length (inactive
        slots write nothing)."""
        k_cache, v_cache = cache
        pos, rows = _write_position(meta, k_cache.shape[2]), jnp.arange(k_cache.shape[0])
        return (
            k_cache.at[rows, :, pos].set(records[:, 0].astype(k_cache.dtype), mode="drop"),
            v_cache.at[rows, :, pos].set(records[:, 1].astype(v_cache.dtype), mode="drop"),
        )

    def _score_value(self):
        """The invariant attention's per-row dots: q [RB, Hkv, G, Dh] against key tiles (K, V) [RB, Hkv, 64, Dh]."""
        d = self.head_dim

        def score_fn(q, kv):
            return jnp.einsum("rkgd,rksd->rkgs", q, kv[0], preferred_element_type=jnp.float32) * d**-0.5

        def value_fn(p, kv):
            return jnp.einsum("rkgs,rksd->rkgd", p.astype(kv[1].dtype), kv[1], preferred_element_type=jnp.float32)

        return score_fn, value_fn

    def attend_prefill(self, q: jax.Array, keys, query_pos: jax.Array) -> jax.Array:
        """q [B, T, Hq, Dh], keys (K, V) [B, Hkv, S, Dh] -> [B, T, Hq * Dh] (float32)."""
        b, t = q.shape[:2]
        hkv, g, d = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        out = inv.prefill_attention(
            q.reshape(b, t, hkv, g, d),
            keys,
            query_pos,
            lambda kv, k0: (inv.key_tile(kv[0], k0, axis=1), inv.key_tile(kv[1], k0, axis=1)),
            *self._score_value(),
        )
        return out.reshape(b, t, self.num_heads * d)

    def attend_decode(self, q: jax.Array, cache, lengths: jax.Array) -> jax.Array:
        """q [N, Hq, Dh], cache (K, V) [N, Hkv, S, Dh] -> [N, Hq * Dh] (float32)."""
        n = q.shape[0]
        hkv, g, d = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        out = inv.decode_attention(
            q.reshape(n, hkv, g, d),
            cache,
            lengths,
            lambda kv, k0: (inv.key_tile(kv[0], k0, axis=2), inv.key_tile(kv[1], k0, axis=2)),
            *self._score_value(),
        )
        return out.reshape(n, self.num_heads * d)

    def output(self, a: jax.Array) -> jax.Array:
        """Rows of attention output [R, Hq * Dh] -> [R, H]."""
        return self.o_proj(a.astype(self.o_proj.kernel.dtype))


class MLAAttention(nnx.Module):
    """DeepSeek multi-head latent attention; HF names q_proj | (q_a_proj, q_a_layernorm, q_b_proj),
    kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj."""

    def __init__(
        self,
        hidden: int,
        num_heads: int,
        q_lora_rank: int | None,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        rms_norm_eps: float,
        attention_bias: bool,
        rope: RopeConfig,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
        prefill_mode: str = "auto",
    ):
        if prefill_mode not in ("auto", "expanded", "absorbed"):
            raise ValueError(f"MLA prefill_mode {prefill_mode!r} not supported (auto, expanded, absorbed)")
        if rope.dim != qk_rope_head_dim:  # failed at the first trace as a broadcast error inside apply_rope
            raise ValueError(f"rope dim {rope.dim} != qk_rope_head_dim {qk_rope_head_dim}")
        self.num_heads = num_heads
        self.kv_lora_rank, self.nope, self.rope_dim, self.v_dim = (
            kv_lora_rank,
            qk_nope_head_dim,
            qk_rope_head_dim,
            v_head_dim,
        )
        self.rope = rope
        self.q_lora_rank = q_lora_rank
        self.prefill_mode = prefill_mode
        self.scale = (qk_nope_head_dim + qk_rope_head_dim) ** -0.5 * softmax_scale_factor(rope)
        kw = {"dtype": dtype, "param_dtype": dtype, "rngs": rngs}
        qk_dim = qk_nope_head_dim + qk_rope_head_dim
        if q_lora_rank is None:
            self.q_proj = nnx.Linear(hidden, num_heads * qk_dim, use_bias=False, **kw)
        else:
            self.q_a_proj = nnx.Linear(hidden, q_lora_rank, use_bias=attention_bias, **kw)
            self.q_a_layernorm = RMSNorm(q_lora_rank, rms_norm_eps, dtype)
            self.q_b_proj = nnx.Linear(q_lora_rank, num_heads * qk_dim, use_bias=False, **kw)
        self.kv_a_proj_with_mqa = nnx.Linear(hidden, kv_lora_rank + qk_rope_head_dim, use_bias=attention_bias, **kw)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, rms_norm_eps, dtype)
        self.kv_b_proj = nnx.Linear(
            kv_lora_rank,
            num_heads * (qk_nope_head_dim + v_head_dim),
            use_bias=False,
            **kw,
        )
        self.o_proj = nnx.Linear(num_heads * v_head_dim, hidden, use_bias=attention_bias, **kw)

    def _q(self, x: jax.Array, positions: jax.Array):
        b, t, _ = x.shape
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.reshape(b, t, self.num_heads, self.nope + self.rope_dim)
        return q[..., : self.nope], apply_rope(q[..., self.nope :], positions, self.rope)  # [B,T,Hq,nope], [B,T,Hq,Dr]

    def _latent(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """x [B, T, H] -> record [B, T, R + Dr] = (normalised c_kv, roped k_pe)."""
        ckv = self.kv_a_proj_with_mqa(x)
        c, k_pe = ckv[..., : self.kv_lora_rank], ckv[..., self.kv_lora_rank :]
        k_pe = apply_rope(k_pe[:, :, None, :], positions, self.rope)[:, :, 0]
        return jnp.concatenate([self.kv_a_layernorm(c), k_pe], axis=-1)

    def _w_kv_b(self):
        w = self.kv_b_proj.kernel[...].reshape(self.kv_lora_rank, self.num_heads, self.nope + self.v_dim)
        return w[..., : self.nope], w[..., self.nope :]  # W_UK [R, Hq, nope], W_UV [R, Hq, v]

    def absorb_pays(self, num_new: int, num_keys: int) -> bool:
        """Static choice for a bucket: absorbed attention has fewer multiply-adds than the expanded form.

        Per head, expanded: S*R*(nope+v) (up-project every latent) + T*S*(nope+Dr+v); absorbed:
        T*nope*R + T*S*(2R+Dr) + T*R*v. Absorption wins for few miss tokens over a long cached prefix
        (agentic short appends: T < ~R*(nope+v) / (2R - nope - v), e.g. ~170 for DeepSeek-V3)."""
        if self.prefill_mode != "auto":
            return self.prefill_mode == "absorbed"
        r, n, dr, v, t, s = self.kv_lora_rank, self.nope, self.rope_dim, self.v_dim, num_new, num_keys
        expanded = s * r * (n + v) + t * s * (n + dr + v)
        absorbed = t * n * r + t * s * (2 * r + dr) + t * r * v
        return absorbed < expanded

    def prefill(self, kv_cached: jax.Array, x: jax.Array, meta: PrefillMeta) -> tuple[jax.Array, jax.Array]:
        """kv_cached [B, C, R + Dr], x [B, T, H] -> (kv_new [B, T, R + Dr], out [B, T, H]).

        Expanded form (per-head keys/values up-projected from the latents) or absorbed form (queries
        folded into the latent space), whichever has fewer multiply-adds for this bucket's static T, C."""
        b, t, _ = x.shape
        c = kv_cached.shape[1]
        positions = meta.positions(t)
        q_nope, q_pe = self._q(x, positions)  # [B, T, Hq, nope], [B, T, Hq, Dr]
        kv_new = meta.zero_padding(self._latent(x, positions).astype(kv_cached.dtype))
        lat = jnp.concatenate([kv_cached, kv_new], axis=1).astype(x.dtype)  # [B, S, R + Dr]
        ckv, k_pe = lat[..., : self.kv_lora_rank], lat[..., self.kv_lora_rank :]
        mask = prefill_mask(meta, c, t)[:, None]  # [B, 1, T, S]
        if self.absorb_pays(t, c + t):
            w_uk, w_uv = self._w_kv_b()
            q_lat = jnp.einsum("bthn,rhn->bthr", q_nope, w_uk)  # [B, T, Hq, R]
            scores = jnp.einsum("bthr,bsr->bhts", q_lat, ckv, preferred_element_type=jnp.float32)
            scores += jnp.einsum("bthd,bsd->bhts", q_pe, k_pe, preferred_element_type=jnp.float32)
            probs = _softmax(scores * self.scale, mask)
            out_lat = jnp.einsum("bhts,bsr->bthr", probs.astype(ckv.dtype), ckv)  # [B, T, Hq, R]
            out = jnp.einsum("bthr,rhv->bthv", out_lat, w_uv)
        else:
            kvb = self.kv_b_proj(ckv).reshape(b, c + t, self.num_heads, self.nope + self.v_dim)
            k_nope, v = kvb[..., : self.nope], kvb[..., self.nope :]
            scores = jnp.einsum("bthn,bshn->bhts", q_nope, k_nope, preferred_element_type=jnp.float32)
            scores += jnp.einsum("bthd,bsd->bhts", q_pe, k_pe, preferred_element_type=jnp.float32)
            probs = _softmax(scores * self.scale, mask)
            out = jnp.einsum("bhts,bshv->bthv", probs.astype(v.dtype), v)
        return kv_new, self.o_proj(out.reshape(b, t, self.num_heads * self.v_dim))

    def decode(self, cache: jax.Array, x: jax.Array, meta: DecodeMeta) -> tuple[jax.Array, jax.Array]:
        """cache [N, S, R + Dr], x [N, 1, H] -> (cache, out [N, 1, H]); absorbed attention."""
        n, s = cache.shape[0], cache.shape[1]
        positions = meta.positions()
        q_nope, q_pe = self._q(x, positions)  # [N, 1, Hq, nope], [N, 1, Hq, Dr]
        cache = self.write_cache(cache, self._latent(x, positions)[:, 0], meta)  # records [N, R + Dr]
        w_uk, w_uv = self._w_kv_b()
        ckv, k_pe = (
            cache[..., : self.kv_lora_rank].astype(x.dtype),
            cache[..., self.kv_lora_rank :].astype(x.dtype),
        )
        q_lat = jnp.einsum("nhd,rhd->nhr", q_nope[:, 0], w_uk)  # [N, Hq, R]
        scores = jnp.einsum("nhr,nsr->nhs", q_lat, ckv, preferred_element_type=jnp.float32)
        scores += jnp.einsum("nhd,nsd->nhs", q_pe[:, 0], k_pe, preferred_element_type=jnp.float32)
        probs = _softmax(scores * self.scale, decode_mask(meta, s)[:, None])
        out_lat = jnp.einsum("nhs,nsr->nhr", probs.astype(ckv.dtype), ckv)  # [N, Hq, R]
        out = jnp.einsum("nhr,rhv->nhv", out_lat, w_uv).reshape(n, 1, self.num_heads * self.v_dim)
        return cache, self.o_proj(out)

    # ---- batch-invariant path (models/layers/invariant.py): absorbed attention, rows in, rows out ----
    def project(self, x: jax.Array, pos: jax.Array):
        """Rows x [R, H], positions [R] -> ((q_lat [R, Hq, R_kv], q_pe [R, Hq, Dr]), records [R, R_kv + Dr])."""
        q_nope, q_pe = self._q(x[:, None], pos[:, None])
        w_uk, _ = self._w_kv_b()
        q_lat = jnp.einsum("thn,rhn->thr", q_nope[:, 0], w_uk)
        return (q_lat, q_pe[:, 0]), self._latent(x[:, None], pos[:, None])[:, 0]

    def prefill_keys(self, kv_cached: jax.Array, kv_new: jax.Array, meta: PrefillMeta) -> jax.Array:
        return inv.absolute_keys(kv_cached, kv_new, meta.cached_lens)  # [B, S, R_kv + Dr]

    def write_cache(self, cache: jax.Array, records: jax.Array, meta: DecodeMeta) -> jax.Array:
        """Decode: the step's records [N, R + Dr] into the cache at each slot's length (inactive slots: nothing)."""
        n, s = cache.shape[0], cache.shape[1]
        return cache.at[jnp.arange(n), _write_position(meta, s)].set(records.astype(cache.dtype), mode="drop")

    def _score_value(self, dtype):
        """The invariant attention's per-row dots: (q_lat [RB, Hq, R_kv], q_pe [RB, Hq, Dr]) against latent
        tiles [RB, 64, R_kv + Dr]."""
        r = self.kv_lora_rank

        def score_fn(q, lat):
            lat = lat.astype(dtype)
            s = jnp.einsum("rhl,rsl->rhs", q[0], lat[..., :r], preferred_element_type=jnp.float32)
            s += jnp.einsum("rhd,rsd->rhs", q[1], lat[..., r:], preferred_element_type=jnp.float32)
            return s * self.scale

        def value_fn(p, lat):
            ckv = lat[..., :r].astype(dtype)
            return jnp.einsum("rhs,rsl->rhl", p.astype(dtype), ckv, preferred_element_type=jnp.float32)

        return score_fn, value_fn

    def attend_prefill(self, q, keys: jax.Array, query_pos: jax.Array) -> jax.Array:
        """q (q_lat [B, T, Hq, R_kv], q_pe [B, T, Hq, Dr]), latents [B, S, R_kv + Dr] -> [B, T, Hq, R_kv]."""
        slice_tile = lambda lat, k0: inv.key_tile(lat, k0, axis=0)  # noqa: E731
        return inv.prefill_attention(q, keys, query_pos, slice_tile, *self._score_value(q[0].dtype))

    def attend_decode(self, q, cache: jax.Array, lengths: jax.Array) -> jax.Array:
        """q (q_lat [N, Hq, R_kv], q_pe [N, Hq, Dr]), cache [N, S, R_kv + Dr] -> [N, Hq, R_kv]."""
        slice_tile = lambda lat, k0: inv.key_tile(lat, k0, axis=1)  # noqa: E731
        return inv.decode_attention(q, cache, lengths, slice_tile, *self._score_value(q[0].dtype))

    def output(self, a: jax.Array) -> jax.Array:
        """Rows of latent attention output [R, Hq, R_kv] -> [R, H] (W_UV, then o_proj)."""
        _, w_uv = self._w_kv_b()
        out = jnp.einsum("thr,rhv->thv", a.astype(w_uv.dtype), w_uv)
        return self.o_proj(out.reshape(a.shape[0], self.num_heads * self.v_dim))
