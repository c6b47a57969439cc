import pytest

from dualpath_jax.registry import Registry


def test_register_and_get():
    reg = Registry("thing")

    @reg.register("a")
    class A:
        pass

    assert reg.get("a") is A
    assert "a" in reg and reg.names() == ["a"] and len(reg) == 1


def test_duplicate_rejected():
    reg = Registry("thing")
    reg.add("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.add("a", 2)
    assert reg.get("a") == 1


def test_unknown_lists_known():
    reg = Registry("policy")
    reg.add("basic", 1)
    reg.add("dualpath", 2)
    with pytest.raises(KeyError, match="known: basic, dualpath"):
        reg.get("dualpth")
