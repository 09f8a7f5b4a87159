import pytest

import leakbench
from leakbench.errors import ConfigError, UnknownNameError
from leakbench.params import Component, Param
from leakbench.registry import ATTACKS, DEFENSES, REGISTRIES, Registry


def test_decorator_registers_and_wildcard_lists():
    reg = Registry("widget")

    @reg.register("alpha-one")
    class A(Component):
        pass

    @reg.register("alpha-two")
    class B(Component):
        pass

    @reg.register("beta")
    class C(Component):
        pass

    assert reg.get("alpha-one") is A and A.registry_name == "alpha-one"
    assert reg.list("alpha*") == ["alpha-one", "alpha-two"]
    assert reg.list() == ["alpha-one", "alpha-two", "beta"]
    assert "beta" in reg and len(reg) == 3


def test_duplicate_name_is_rejected():
    reg = Registry("widget")
    reg.add("x", int)
    with pytest.raises(ValueError, match="already registered"):
        reg.add("x", float)


def test_unknown_name_suggests_closest_and_lists_available():
    with pytest.raises(UnknownNameError) as err:
        ATTACKS.get("dgl")
    msg = str(err.value)
    assert "Did you mean 'dlg'?" in msg
    for name in leakbench.list_attacks():
        assert name in msg
    assert "\n" not in msg


def test_builtin_registries_are_populated():
    assert {"dlg", "idlg", "dlg-batched"} <= set(leakbench.list_attacks())
    assert {"none", "gaussian-noise", "laplacian-noise", "pruning", "quantization", "large-batch"} <= set(
        leakbench.list_defenses())
    assert {"digits", "mnist", "cifar10", "cifar100", "svhn", "lfw", "att-faces"} <= set(leakbench.list_datasets())
    assert {"lenet-zhu", "mlp"} <= set(leakbench.list_models())
    assert leakbench.list_defenses("*-noise") == ["gaussian-noise", "laplacian-noise"]


@pytest.mark.parametrize("kind", sorted(REGISTRIES))
def test_every_component_declares_valid_defaults(kind):
    """Every registered component builds from its declared defaults, keyword-only."""
    reg = REGISTRIES[kind]
    for name in reg.list():
        obj = reg.build(name)
        assert obj.get_params() == reg.get(name).validate_params({})
        if reg.get(name).params:
            with pytest.raises(TypeError):
                reg.get(name)(1)  # positional arguments are refused


def test_parameter_errors_name_the_key_and_what_is_allowed():
    with pytest.raises(ConfigError, match=r"gaussian-noise: parameter 'variance' = -1.0 is invalid; allowed: a number >= 0"):
        DEFENSES.build("gaussian-noise", {"variance": -1.0})
    with pytest.raises(ConfigError, match=r"unknown parameter 'ration'. Did you mean 'ratio'\?"):
        DEFENSES.build("pruning", {"ration": 0.5})
    with pytest.raises(ConfigError, match=r"'format' = 'int4' is invalid; allowed: one of 'fp16', 'bf16', 'int8'"):
        DEFENSES.build("quantization", {"format": "int4"})
    with pytest.raises(ConfigError, match=r"'steps' = 2.5 is invalid; allowed: an integer >= 1"):
        ATTACKS.build("dlg", {"steps": 2.5})


def test_param_coercion():
    p = Param("v", float, 1.0, low=0.0)
    assert p.coerce("1e-4", "x") == 1e-4  # YAML 1.1 reads 1e-4 as a string
    assert p.coerce(3, "x") == 3.0
    with pytest.raises(ConfigError):
        p.coerce(True, "x")
    with pytest.raises(ConfigError):
        p.coerce(float("nan"), "x")
    assert Param("n", int, 1).coerce(4.0, "x") == 4
