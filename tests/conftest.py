"""Fixtures shared by the runtime tests (tests/test_runtime.py, tests/test_runtime_cnic.py): the small `:test`
runtime config, its model ops, trajectories and the single-process reference tokens (module-scoped: each test
module builds them once)."""

from __future__ import annotations

import pytest

from configs.tiny_runtime import get_config
from dualpath_jax.runtime import driver
from dualpath_jax.runtime.config import RuntimeConfig
from dualpath_jax.runtime.lifecycle import ConversationBook
from dualpath_jax.runtime.model_ops import ModelOps, reference_conversations


@pytest.fixture(scope="module")
def base() -> RuntimeConfig:
    return RuntimeConfig.from_config_dict(get_config("test").runtime)


@pytest.fixture(scope="module")
def ops(base) -> ModelOps:
    return ModelOps(base.model, base.model_seed)


@pytest.fixture(scope="module")
def trajs(base):
    return driver.make_trajectories(base)


@pytest.fixture(scope="module")
def reference(base, ops, trajs) -> dict:
    return reference_conversations(
        ops, lambda: ConversationBook(trajs, ops.vocab_size, seed=base.workload.seed), base.cluster.max_seq_len
    )
