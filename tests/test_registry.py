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


def test_unknown_suggests_a_near_miss():
    reg = Registry("policy")
    for name in ("basic", "dualpath", "round_robin"):
        reg.add(name, name)
    with pytest.raises(KeyError, match=r"unknown policy 'dualpth' \(did you mean 'dualpath'\?\); known: basic"):
        reg.get("dualpth")
    with pytest.raises(KeyError) as e:
        reg.get("zzz")
    assert "did you mean" not in str(e.value)


def test_names_of_the_wrong_type():
    reg = Registry("policy")
    reg.add("basic", 1)
    for bad in (None, 3, "", b"basic"):
        with pytest.raises(ValueError, match="policy name must be a non-empty string"):
            reg.add(bad, 2)
    # an unhashable name was a bare "unhashable type: 'list'" TypeError
    with pytest.raises(KeyError, match=r"unknown policy \['basic'\]; known: basic"):
        reg.get(["basic"])
    assert ["basic"] not in reg and 3 not in reg
