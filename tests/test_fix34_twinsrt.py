"""Session 51 (twins outside the transports): what merging the code twins changed in behaviour."""

from types import SimpleNamespace


def test_bench_runtimes_store_copy_holds_exactly_the_runtimes_blocks():
    """`bench_runtime.sim_store_capacity_gb` added half a byte to the blocks' bytes against the simulator flooring
    GB x 1e9 / B per token; since its rooms within ROOM_SLACK of whole tokens read as those tokens, the half byte only
    made a large store at a few bytes a token one token larger than its blocks (509,350,992 tokens at 1 B/token: one
    more). The copy's room is now the runtime's whole blocks, to the token."""
    from dualpath_jax.runtime.config import RuntimeConfig
    from dualpath_jax.runtime.node import block_layout
    from dualpath_jax.sim.simulator import GB, _room_tokens
    from dualpath_jax.store import block_file
    from experiments.bench_runtime import sim_store_capacity_gb

    cfg = RuntimeConfig()
    for b, blocks in ((1, 509_350_992 // cfg.block_size), (1, 3), (128, 15), (1024, 15), (70_272, 123_457)):
        ops = SimpleNamespace(
            kv_layout=SimpleNamespace(num_layers=1, bytes_per_token_per_layer=b),
            fingerprint="fp",
            config=SimpleNamespace(kv_bytes_per_token=b),
        )
        file_b = block_file.file_nbytes(block_layout(cfg, ops))
        bounded = cfg.replace(store_options={"capacity_bytes": blocks * file_b + file_b - 1})  # (a part block: none)
        gb = sim_store_capacity_gb(bounded, ops)
        tokens = blocks * cfg.block_size
        assert _room_tokens(gb, b, "store_capacity_gb") == tokens, (b, blocks)
        assert abs(gb * GB - tokens * b) <= 1e-6 * tokens * b, (b, blocks)  # the blocks' bytes, not half a byte more
