import pytest

from zomem.errors import UnknownNameError, UsageError
from zomem.registry import Registry, load_object


def test_register_get_and_suggest() -> None:
    registry: Registry[int] = Registry("thing")
    registry.register("alpha", 1)

    @registry.register("beta")
    def beta() -> None: ...

    registry.register("gamma", "math:pi")
    assert registry.get("alpha") == 1 and registry.get("beta") is beta
    assert registry.get("gamma") == pytest.approx(3.14159, rel=1e-5)
    with pytest.raises(UnknownNameError) as info:
        registry.get("alpah")
    assert "Did you mean alpha" in str(info.value) and "Valid: alpha, beta, gamma" in str(info.value)


def test_load_object_errors() -> None:
    with pytest.raises(UsageError, match="module:object"):
        load_object("math.pi")
    with pytest.raises(UsageError, match="cannot import"):
        load_object("no_such_module_zz:X")
    with pytest.raises(UsageError, match="no attribute"):
        load_object("math:nothing")
