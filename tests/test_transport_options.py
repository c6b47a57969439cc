"""`config.transport_options`: fields of the transport backend's endpoints besides those the launchers set, given to
every endpoint of a run (e.g. tcp's `timeout_s`, how soon a silent peer's pending transfers fail). Before 2026-12-05
the launchers passed only a name and a pacer (host and secret with Ray), so a backend's own settings could not be
set from a config."""

from __future__ import annotations

import pytest

from dualpath_jax.runtime.config import ConfigError, validate
from dualpath_jax.runtime.launcher import _transport_factory, endpoint_spec


def test_every_endpoint_gets_the_options(base):
    cfg = base.replace(transport="tcp", transport_options={"timeout_s": 7.5, "max_message_bytes": 1 << 20})
    validate(cfg)
    assert endpoint_spec(cfg, "engine0") == {
        "backend": "tcp",
        "name": "engine0",
        "timeout_s": 7.5,
        "max_message_bytes": 1 << 20,
    }
    ep = _transport_factory(cfg)("engine0", None)  # (what every launcher's node builds)
    try:
        assert ep.timeout_s == 7.5
    finally:
        ep.close()
    # Ray's host and secret are the launcher's, beside the options
    assert endpoint_spec(cfg, "engine1", host="10.0.0.2", secret="s")["timeout_s"] == 7.5


def test_an_option_the_backend_does_not_take_is_named_with_its_fields(base):
    cfg = base.replace(transport="tcp", transport_options={"timeout": 5})
    with pytest.raises(
        ConfigError,
        match=r"config.transport_options: TcpTransport \('tcp'\) takes no timeout; its other fields: "
        r"handshake_step_s, handshake_timeout_s, host, max_message_bytes, max_pending_handshakes, max_sets, "
        r"max_sets_per_peer, port, reply_copy_max_bytes, secret, timeout_s",
    ):
        validate(cfg)


def test_an_option_the_launcher_sets_is_refused(base):
    with pytest.raises(ConfigError, match=r"config.transport_options sets name, pacer, which the launcher sets"):
        validate(base.replace(transport_options={"name": "x", "pacer": None}))
    with pytest.raises(ConfigError, match=r"sets ib_port, which config.rdma sets for every endpoint"):
        validate(base.replace(transport="rdma", launcher="local", transport_options={"ib_port": 2}))
    with pytest.raises(ConfigError, match=r"sets secret, which the launcher sets"):
        validate(base.replace(transport="tcp", launcher="ray", transport_options={"secret": "mine"}))
    with pytest.raises(ConfigError, match=r"keys must be field names \(str\), got \[1\]"):
        validate(base.replace(transport_options={1: 2}))
