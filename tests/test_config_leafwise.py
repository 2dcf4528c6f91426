"""Validating a change leaf by leaf (``config.leafwise``): it must give what validating
the whole model gives, and decline every schema where it could not."""

from __future__ import annotations

import enum
import functools
from typing import Annotated, Any, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    FutureDatetime,
    PlainSerializer,
    PrivateAttr,
    RootModel,
    SecretStr,
    ValidationError,
    computed_field,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from hotknob.config.changes import changed_keys
from hotknob.config.keys import parse_text
from hotknob.config.leafwise import leaf_check, model_with, validate_plain_put, validate_puts
from hotknob.config.merge import LeafInput, validate_leaves
from hotknob.config.schema import MLParams, iter_leaves


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Knobs(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, allow_inf_nan=False)

    rate: float = Field(0.5, gt=0, le=1)
    maybe: float | None = Field(None, ge=0)
    steps: int = Field(1, ge=1, strict=True)
    mode: Literal["fast", "slow"] = "fast"
    colour: Colour = Colour.RED
    label: str = Field("x", max_length=5, pattern="^[a-z ]*$")
    flag: bool = False
    sizes: list[int] = Field(default_factory=lambda: [1], max_length=3)
    weights: dict[str, float] = Field(default_factory=dict)
    pair: tuple[int, str] = (1, "a")


class Lower(BaseModel):
    model_config = ConfigDict(str_to_lower=True)

    name: str = "a"
    colour: Colour = Colour.RED


class Outer(BaseModel):
    inner: Lower = Field(default_factory=Lower)


class Wide(BaseModel):
    knobs: Knobs = Field(default_factory=Knobs)
    outer: Outer = Field(default_factory=Outer)
    top: int = 3


KEYS = [leaf.key for leaf in iter_leaves(Wide)]
json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-3, 12)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(["fast", "slow", " ab ", "ABC", "red", "blue", "toolong", "1", "0.5"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=2), inner),
    max_leaves=6,
)
# Values near each key's rules, most of them valid: random JSON alone is nearly always
# refused, and the comparison is of what is accepted as much as of what is not.
NEAR: dict[str, list[Any]] = {
    "knobs.rate": [0.25, 1, "0.5", 0, 1.5, True],
    "knobs.maybe": [None, 0, 2.5, -1],
    "knobs.steps": [1, 5, "5", 2.0, 0],
    "knobs.mode": ["fast", "slow", " slow ", "Fast"],
    "knobs.colour": ["red", "blue", "green"],
    "knobs.label": ["ab", " ab ", "a b", "AB", "toolong"],
    "knobs.flag": [True, False, "yes", 0, 2],
    "knobs.sizes": [[], [1, 2], ["3"], [1, 2, 3, 4]],
    "knobs.weights": [{}, {"a": 1}, {"a": "x"}],
    "knobs.pair": [[2, "b"], (3, "c"), [1], ["x", "y"]],
    "outer.inner.name": ["B", " Mixed ", 3],
    "outer.inner.colour": ["blue", "BLUE", None],
    "top": [4, "7", 1.5, None],
}
assert sorted(NEAR) == sorted(KEYS)
puts = st.sampled_from(KEYS).flatmap(
    lambda key: st.tuples(st.just(key), st.sampled_from(NEAR[key]) | json_like)
)


def whole(schema: type[BaseModel], base: LeafInput, puts: dict[str, Any]) -> Any:
    """What validating the whole model gives: the model, values, flat values."""
    return validate_leaves(schema, base.with_leaves(schema, puts))


@settings(max_examples=300, deadline=None)
@given(
    first=st.lists(puts, max_size=3).map(dict),
    then=st.lists(puts, min_size=1, max_size=3).map(dict),
)
def test_alone_gives_what_the_whole_model_gives(
    first: dict[str, Any], then: dict[str, Any]
) -> None:
    base = LeafInput({})
    try:  # a state in force to start from: any valid one
        model, values, flat = whole(Wide, base, first)
        base = base.with_leaves(Wide, first)
    except ValidationError:
        model, values, flat = whole(Wide, base, {})
    assert all(leaf_check(Wide, key) is not None for key in then)
    try:
        new_model, new_values, new_flat = whole(Wide, base, then)
    except ValidationError:
        with pytest.raises(ValidationError):
            validate_puts(Wide, values, flat, then)
        return
    alone = validate_puts(Wide, values, flat, then)
    assert alone is not None
    assert alone.values == new_values and alone.flat == new_flat
    assert list(alone.values) == list(new_values)  # the same order: clients get the same JSON
    assert alone.changed == changed_keys(flat, new_flat)
    assert model_with(model, alone.validated) == new_model


@settings(max_examples=300, deadline=None)
@given(first=st.lists(puts, max_size=3).map(dict), put=puts)
def test_one_plain_value_alone_gives_what_validate_puts_gives(
    first: dict[str, Any], put: tuple[str, Any]
) -> None:
    """``validate_plain_put``: the same state as ``validate_puts`` where it takes the value,
    and where it declines, a value ``validate_puts`` refuses, another kind of value or
    dump, or one that changes nothing."""
    try:
        _, values, flat = whole(Wide, LeafInput({}).with_leaves(Wide, first), {})
    except ValidationError:
        _, values, flat = whole(Wide, LeafInput({}), {})
    key, value = put
    check = leaf_check(Wide, key)
    assert check is not None
    lone = validate_plain_put(check, key, value, values, flat)
    try:
        alone = validate_puts(Wide, values, flat, {key: value})
    except ValidationError:
        assert lone is None
        return
    if lone is None:
        plain = (str, int, float, bool, type(None))
        assert (
            alone is None
            or not alone.changed
            or type(value) not in plain
            or type(alone.flat[key]) not in plain
        )
        return
    assert alone is not None
    assert (lone.values, lone.flat, lone.changed) == (alone.values, alone.flat, alone.changed)
    assert lone.validated == alone.validated


def test_nothing_given_is_edited() -> None:
    model, values, flat = validate_leaves(Wide, LeafInput({}))
    before = (model.model_dump(), repr(values), dict(flat))
    alone = validate_puts(Wide, values, flat, {"outer.inner.name": "B", "knobs.rate": 0.25})
    assert alone is not None and alone.changed == {"outer.inner.name": "b", "knobs.rate": 0.25}
    model_with(model, alone.validated)
    assert (model.model_dump(), repr(values), dict(flat)) == before


def test_every_leaf_of_the_built_in_schema_is_validated_alone() -> None:
    assert all(leaf_check(MLParams, leaf.key) for leaf in iter_leaves(MLParams))


def _check(field: Any = int, **extra: Any) -> Any:
    """``leaf_check`` of ``sec.v`` in a schema whose section has ``v`` and ``extra``."""
    section = type("Section", (BaseModel,), {"__annotations__": {"v": field}, "v": 1, **extra})
    schema = type("Schema", (BaseModel,), {"__annotations__": {"sec": section}})
    return leaf_check(schema, "sec.v")


def test_a_plain_section_is_validated_alone() -> None:
    assert _check() is not None


def _after(self: Any) -> Any:
    return self


@pytest.mark.parametrize(
    "field, extra",
    [
        pytest.param(int, {"check": model_validator(mode="after")(_after)}, id="model-validator"),
        pytest.param(
            int,
            {
                "w": 2,
                "__annotations__": {"v": int, "w": int},
                "check": field_validator("w")(classmethod(lambda cls, value, info: value)),
            },
            id="field-validator-on-another-field",
        ),
        pytest.param(
            int, {"show": field_serializer("v")(lambda self, value: value)}, id="field-serializer"
        ),
        pytest.param(
            int,
            {"twice": computed_field(property(lambda self: 2), return_type=int)},
            id="computed-field",
        ),
        pytest.param(int, {"_p": PrivateAttr(0)}, id="private-attribute"),
        pytest.param(int, {"model_post_init": lambda self, context: None}, id="post-init"),
        pytest.param(Annotated[int, AfterValidator(lambda v: v)], {}, id="annotated-validator"),
        pytest.param(Annotated[int, PlainSerializer(str)], {}, id="annotated-serializer"),
        pytest.param(int, {"v": Field(1, alias="vee")}, id="alias"),
        pytest.param(int, {"v": Field(1, exclude=True)}, id="excluded"),
        pytest.param(SecretStr, {"v": SecretStr("abcd")}, id="secret"),
        pytest.param(list[Outer], {"v": []}, id="model-inside-the-type"),
    ],
)
def test_a_section_or_leaf_that_may_look_beyond_the_value_is_declined(
    field: Any, extra: dict[str, Any]
) -> None:
    assert _check(field, **extra) is None


def test_a_rule_across_sections_declines_every_key() -> None:
    class Ruled(BaseModel):
        knobs: Knobs = Field(default_factory=Knobs)

        @model_validator(mode="after")
        def rule(self) -> Ruled:
            return self

    assert leaf_check(Ruled, "knobs.rate") is None


def test_a_section_wrapped_in_a_validator_is_declined() -> None:
    class Wrapped(BaseModel):
        knobs: Annotated[Knobs, AfterValidator(lambda knobs: knobs)] = Field(default_factory=Knobs)

    assert leaf_check(Wrapped, "knobs.rate") is None


def test_a_root_model_section_is_declined() -> None:
    class Rooted(BaseModel):
        sec: RootModel[dict[str, int]] = Field(default_factory=lambda: RootModel({}))

    assert leaf_check(Rooted, "sec.root") is None


def test_a_change_with_one_key_that_is_declined_is_declined_whole() -> None:
    class Mixed(BaseModel):
        knobs: Knobs = Field(default_factory=Knobs)
        token: SecretStr = SecretStr("abcd")

    _model, values, flat = validate_leaves(Mixed, LeafInput({}))
    assert validate_puts(Mixed, values, flat, {"knobs.rate": 0.25, "token": "efgh"}) is None


def test_an_unknown_key_is_declined() -> None:
    assert leaf_check(Wide, "knobs.nope") is None
    assert leaf_check(Wide, "nope.rate") is None
    assert leaf_check(Wide, "knobs") is None  # a section, not a leaf


def _schema(section: type[BaseModel]) -> type[BaseModel]:
    return type(
        "Schema",
        (BaseModel,),
        {"__annotations__": {"sec": section}, "sec": Field(default_factory=section)},
    )


def test_a_schema_that_overrides_what_a_whole_validation_calls_is_declined() -> None:
    class Validates(BaseModel):
        knobs: Knobs = Field(default_factory=Knobs)

        @classmethod
        def model_validate(cls, obj: Any, **kwargs: Any) -> Validates:
            return super().model_validate(obj, **kwargs)

    class Dumps(BaseModel):
        knobs: Knobs = Field(default_factory=Knobs)

        def model_dump(self, **kwargs: Any) -> dict[str, Any]:
            return super().model_dump(**kwargs)

    class OwnSchema(BaseModel):
        v: int = 1

        @staticmethod
        def __get_pydantic_core_schema__(source: Any, handler: Any) -> Any:
            return handler(source)

    class Cached(BaseModel):
        v: int = 1

        @functools.cached_property
        def twice(self) -> int:
            return 2 * self.v

    assert leaf_check(Validates, "knobs.rate") is None
    assert leaf_check(Dumps, "knobs.rate") is None
    assert leaf_check(_schema(OwnSchema), "sec.v") is None  # no ``__func__``: no crash
    assert leaf_check(_schema(Cached), "sec.v") is None  # a copy would keep ``twice``


def test_a_field_excluded_on_a_condition_is_declined() -> None:
    if "exclude_if" not in FieldInfo.__slots__:
        pytest.skip("this pydantic has no exclude_if")
    assert _check(int, v=Field(1, exclude_if=lambda v: v == 0)) is None


def test_a_rule_against_the_clock_anywhere_declines_every_key() -> None:
    """A ``FutureDatetime`` valid when put may be refused by the next whole validation,
    of any change: validating another value alone would let the change through."""

    class Job(BaseModel):
        lr: float = 0.1
        stop_at: FutureDatetime | None = None

    assert leaf_check(_schema(Job), "sec.lr") is None


def test_the_changed_keys_come_in_schema_order() -> None:
    _model, values, flat = validate_leaves(Wide, LeafInput({}))
    alone = validate_puts(Wide, values, flat, {"top": 9, "knobs.steps": 4, "knobs.rate": 0.25})
    assert alone is not None
    assert list(alone.changed) == ["knobs.rate", "knobs.steps", "top"]


def test_a_value_pydantic_cannot_dump_is_left_to_the_whole_validation() -> None:
    """Nested more deeply than pydantic serializes: declined (None), not raised; an
    invalid value beside it is refused first, as a whole validation refuses it."""

    class Loose(BaseModel):
        extra: dict[str, Any] = Field(default_factory=dict)
        steps: int = Field(1, ge=1)

    schema = _schema(Loose)
    deep = parse_text('{"x":' + "[" * 256 + "]" * 256 + "}")
    _model, values, flat = validate_leaves(schema, LeafInput({}))
    assert leaf_check(schema, "sec.extra") is not None
    assert validate_puts(schema, values, flat, {"sec.extra": deep}) is None
    with pytest.raises(ValidationError):
        validate_puts(schema, values, flat, {"sec.extra": deep, "sec.steps": 0})
