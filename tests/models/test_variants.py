"""models.variants: the one-of check, nested configs built from layers of fields (a whole
instance replaces, a dict updates), derived fields refused, nested errors' full keys."""
import dataclasses

import pytest

from models import variants


@dataclasses.dataclass(frozen=True)
class Inner:
    size: int = 2
    kind: str = "a"
    table: int = 0                          # set by the parent

    def __post_init__(self):
        variants.check_one_of("model", "kind", self.kind, ("a", "b"))
        if self.size <= 0:
            raise ValueError(f"model.size must be positive, got {self.size}")


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str = "x"
    inner: Inner = dataclasses.field(default_factory=Inner, metadata={"derived": ("table",)})

    def __post_init__(self):
        object.__setattr__(self, "inner", dataclasses.replace(self.inner, table=7))


def test_check_one_of_message_is_exact():
    variants.check_one_of("model", "pool", "gap", ("cls", "gap"))
    with pytest.raises(ValueError) as e:
        variants.check_one_of("model", "pool", "max", ("cls", "gap"))
    assert str(e.value) == "model.pool='max' is not allowed; allowed: cls, gap"
    with pytest.raises(ValueError) as e:     # non-string choices, any prefix
        variants.check_one_of("recurrent", "unroll", 3, (1, 2))
    assert str(e.value) == "recurrent.unroll=3 is not allowed; allowed: 1, 2"


def test_build_merges_nested_layers_in_order():
    variant = dict(name="v", inner=dict(size=5))
    cfg = variants.build(Outer, [variant, dict(inner=dict(kind="b"))], "outer")
    assert cfg == Outer(name="v", inner=Inner(size=5, kind="b", table=7))
    # A whole instance replaces; a later dict updates that instance.
    cfg = variants.build(Outer, [dict(inner=Inner(size=9)), dict(inner=dict(kind="b"))],
                         "outer")
    assert cfg.inner == Inner(size=9, kind="b", table=7)
    assert variants.replace(cfg, dict(inner=dict(size=1)), "outer").inner == Inner(1, "b", 7)


def test_nested_errors_name_the_full_key():
    cases = [
        (dict(inner=dict(size=0)), "model.inner.size must be positive, got 0"),
        (dict(inner=dict(kind="c")), "model.inner.kind='c' is not allowed; allowed: a, b"),
        (dict(inner=dict(table=1)),
         "model.inner keys ['table'] are set by the outer config itself and cannot be "
         "overridden"),
        (dict(inner=dict(tabel=1)), "unknown outer.inner config keys ['tabel']; allowed: "
                                    "kind, size"),
        (dict(nme="y"), "unknown outer config keys ['nme']; allowed: inner, name"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError) as e:
            variants.build(Outer, [overrides], "outer")
        assert str(e.value) == message


def test_nested_errors_prefix_every_model_key_once_per_level():
    with pytest.raises(ValueError) as e:
        with variants.nested_errors("vit"):
            with variants.nested_errors("encoder"):
                raise ValueError("model.d_model (30) must be divisible by model.num_heads (4)")
    assert str(e.value) == ("model.vit.encoder.d_model (30) must be divisible by "
                            "model.vit.encoder.num_heads (4)")


def test_from_variant_names_the_unknown_variant():
    with pytest.raises(ValueError) as e:
        variants.from_variant(Outer, {"small": {}, "big": {}}, "huge", {}, "outer")
    assert str(e.value) == "unknown outer variant 'huge'; allowed: small, big"
