"""Guard of models.config.KV_NUMERICS (fix29 compat audit F1): the sha256 of the prefill KV of tiny models, pinned
per KV_NUMERICS. A commit that changes the KV bytes a config computes without bumping KV_NUMERICS fails here (a store
written before it would be served as this version's KV); after a bump the test skips until the new hashes are
recorded.

The bytes are XLA's, so they may depend on the host: the table is keyed by (KV_NUMERICS, jax version, backend, the
CPU's vector flags from /proc/cpuinfo), and a host not in it skips, saying so. To record a host (or the hashes of a
new KV_NUMERICS, on a commit whose numerics you checked): `python -m tests.test_fix29_compatstore_kv` prints the
entry to add to `_PINNED`.

Measured (compat audit, XLA:CPU jax 0.10.2): 98e5330's bf16 rounding changed tiny_qwen2 bf16's hash (2950b1ba ->
df90015b) and 9bb3609's RoPE arithmetic tiny_qwen2 f32's (b56a2035 -> 281cbaf2), both under one fingerprint.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from models.config import KV_NUMERICS

_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "avx2", "fma")  # the ones XLA:CPU's code generation may take


def host_key() -> tuple:
    """(KV_NUMERICS, jax version, backend, '+'.join of the _FLAGS this CPU has)."""
    import jax

    try:
        with open("/proc/cpuinfo") as f:
            have = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        have = set()
    return KV_NUMERICS, jax.__version__, jax.default_backend(), "+".join(f for f in _FLAGS if f in have)


_PINNED = {
    (4, "0.10.2", "cpu", "avx2+fma"): {
        "tiny_qwen2/float32": "281cbaf245d3a26fbead0103836634a084400f74e548bd7ad53691483b142dd7",
        "tiny_qwen2/bfloat16": "df90015b02e03055e8e20eddf6ec16037accc3d9704fabdbf1ff38fcca2ef727",
        "tiny_deepseek/float32": "bd6d14d85723d5fc09d7a32623972f0a92e6adba192fa4591fd1caf8b9620073",
        "tiny_deepseek/bfloat16": "49adc9f0f4d2ac74e93f67e58ebe2b54d7545a221d7ef3892641bb4e31b46630",
    },
}
# tiny_qwen2 runs by default (~4 s each); tiny_deepseek's MLA compiles for ~8 s, so it is `slow`
_CASES = [
    "tiny_qwen2/float32",
    "tiny_qwen2/bfloat16",
    pytest.param("tiny_deepseek/float32", marks=pytest.mark.slow),
    pytest.param("tiny_deepseek/bfloat16", marks=pytest.mark.slow),
]


def prefill_kv_sha256(case: str) -> str:
    """sha256 of the prompt's own KV rows (no bucket padding) of a full prefill, model seed 0."""
    from models.registry import tiny_config
    from models.runner import ModelRunner, PrefillRequest

    name, dtype = case.split("/")
    tokens = np.arange(1, 40, dtype=np.int32) * 7 % 100  # [39]
    runner = ModelRunner(tiny_config(name, dtype=dtype), seed=0, num_slots=1, capacity=64)
    kv, _, _ = runner.prefill_whole([PrefillRequest(tokens, 0)])  # [L, slots, capacity, *record]
    real = np.ascontiguousarray(np.asarray(kv)[:, 0, : len(tokens)])
    return hashlib.sha256(real.tobytes()).hexdigest()


@pytest.mark.parametrize("case", _CASES)
def test_kv_bytes_match_the_pinned_kv_numerics(case):
    key = host_key()
    pinned = _PINNED.get(key)
    if pinned is None:
        pytest.skip(
            f"no KV hashes pinned for {key} (KV_NUMERICS, jax, backend, CPU flags): record them with "
            "`python -m tests.test_fix29_compatstore_kv` (see the module docstring)"
        )
    got = prefill_kv_sha256(case)
    assert got == pinned[case], (
        f"{case}: the prefill KV bytes changed under KV_NUMERICS={KV_NUMERICS} ({got[:16]}, pinned "
        f"{pinned[case][:16]}): bump models.config.KV_NUMERICS in the commit that changes them (stores written "
        "before would be served as this version's KV), then record the new hashes"
    )


if __name__ == "__main__":
    print(f"    {host_key()!r}: {{")
    for c in ("tiny_qwen2/float32", "tiny_qwen2/bfloat16", "tiny_deepseek/float32", "tiny_deepseek/bfloat16"):
        print(f'        "{c}": "{prefill_kv_sha256(c)}",')
    print("    },")
