"""Keys of the schema across the layers: which etcd paths read back as keys, keys inside
mapping and model leaves, what shadows them, and the booleans a number refuses."""

from __future__ import annotations

import dataclasses
from enum import Enum
from pathlib import Path
from typing import Any, Literal, Optional

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, Field, RootModel, model_validator

from hotknob.config import (
    InvalidChange,
    cli_layer,
    defaults_layer,
    env_layer,
    etcd_layer,
    files_layer,
    merge_layers,
)
from hotknob.config.dropping_invalid import merge_dropping_invalid
from hotknob.config.keys import etcd_key, key_from_etcd, key_path_fault
from hotknob.config.schema_facts import is_known
from hotknob.config.sendable import entry_bytes, state_bytes
from hotknob.config.sources import Layer
from tests.test_config_merge import APP, Loose

# --- keys that etcd can hold -------------------------------------------------------------------


@pytest.mark.parametrize("key", ["train.lr", "weights.head", "weights.a b", "weights.é", "x"])
def test_a_key_with_an_etcd_path_reads_back_from_it_as_itself(key: str) -> None:
    assert key_path_fault(key) is None
    assert key_from_etcd(APP, etcd_key(APP, key)) == key


@pytest.mark.parametrize(
    "key", ["weights.c/", "weights.a/b", "weights./c", "train..lr", ".lr", "lr.", "a/b"]
)
def test_a_key_whose_etcd_path_reads_back_as_another_or_none_has_a_fault(key: str) -> None:
    assert key_path_fault(key) is not None
    assert key_from_etcd(APP, etcd_key(APP, key)) != key


def test_a_key_under_a_mapping_leaf_is_known_and_one_under_another_leaf_is_not() -> None:
    assert is_known(Loose, "weights") and is_known(Loose, "weights.head")
    assert not is_known(Loose, "weights.a.b")  # below a number, as ``x.y`` is
    assert not is_known(Loose, "x.y") and not is_known(Loose, "nope")


class _Creds(BaseModel):
    user: str = "ada"


class _Held(BaseModel):
    opt: Optional[_Creds] = None  # noqa: UP045 - the spelling under test
    by: dict[str, _Creds] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)


def test_a_typo_below_a_model_a_leaf_holds_is_no_key() -> None:
    # The model would drop it without a word (pydantic ignores extra keys by default).
    assert is_known(_Held, "opt.user") and is_known(_Held, "by.one.user")
    assert not is_known(_Held, "opt.usr") and not is_known(_Held, "by.one.usr")
    assert is_known(_Held, "extra.a.b.c")  # ``Any`` holds anything
    with pytest.raises(InvalidChange) as info:
        merge_layers(_Held, [defaults_layer(_Held), cli_layer(["opt.usr=1"])])
    assert str(info.value) == "opt.usr (from cli): not a key of the schema"


class _Loose(BaseModel):
    extra: dict[str, Any] = Field(default_factory=dict)
    steps: int = 1


class _LooseRoot(BaseModel):
    sec: _Loose = Field(default_factory=_Loose)


def test_a_value_nested_deeper_than_pydantic_dumps_is_refused_with_its_key() -> None:
    """Valid, but pydantic's serializer stops at about 250 levels: refused, naming the key
    and its layer (it raised a ValueError out of the merge, and out of the daemon's
    watch thread)."""
    deep = '{"x":' + "[" * 256 + "]" * 256 + "}"
    etcd = etcd_layer(APP, {etcd_key(APP, "sec.extra"): deep, etcd_key(APP, "sec.steps"): "2"})
    with pytest.raises(InvalidChange) as caught:
        merge_layers(_LooseRoot, [defaults_layer(_LooseRoot), etcd])
    [problem] = caught.value.problems
    assert (problem.key, problem.layer) == ("sec.extra", "etcd")
    assert "JSON" in problem.reason and problem.value is None


def test_a_leaf_the_schema_leaves_out_of_its_dump_is_refused() -> None:
    if "exclude_if" not in Field(1).__slots__:
        pytest.skip("this pydantic has no exclude_if")

    class Clipped(BaseModel):
        clip: float = Field(1.0, exclude_if=lambda v: v == 0)

    class Root(BaseModel):
        sec: Clipped = Field(default_factory=Clipped)

    etcd = etcd_layer(APP, {etcd_key(APP, "sec.clip"): "0"})
    with pytest.raises(InvalidChange) as caught:
        merge_layers(Root, [defaults_layer(Root), etcd])
    [problem] = caught.value.problems
    assert (problem.key, problem.layer) == ("sec.clip", "etcd")
    assert "exclude_if" in problem.reason


# --- keys of a mapping across layers -----------------------------------------------------------


class _Nested(BaseModel):
    """A mapping of mappings, a mapping of models, and a section that is None by default."""

    class Entry(BaseModel):
        a: int = 0

    class Opt(BaseModel):
        a: int = 1
        b: str = "x"

    extra: dict[str, Any] = Field(default_factory=lambda: {"opt": {"beta": 0.9}, "n": 1})
    by: dict[str, Entry] = Field(default_factory=lambda: {"one": _Nested.Entry()})
    opt: Optional[Opt] = None  # noqa: UP045 - the spelling under test
    weights: dict[str, float] = Field(default_factory=lambda: {"head": 1.0, "body": 0.5})


def test_a_layer_that_gives_a_mapping_whole_shadows_lower_keys_inside_it() -> None:
    etcd = Layer("etcd", {"weights.head": 5.0})
    cli = cli_layer(['weights={"head": 9, "body": 9}'])
    snap = merge_layers(_Nested, [defaults_layer(_Nested), etcd, cli])
    assert snap.flat["weights"] == {"head": 9.0, "body": 9.0}
    assert snap.sources["weights"] == "cli"
    # ...while a higher layer's key inside a lower layer's mapping changes that key only.
    snap = merge_layers(
        _Nested,
        [
            defaults_layer(_Nested),
            Layer("etcd", {"weights": {"head": 2}}),
            cli_layer(["weights.head=7"]),
        ],
    )
    assert snap.flat["weights"] == {"head": 7.0}
    # The leaf is from the highest layer that gave it a part: explain's FROM, the sources
    # sent to clients.
    assert snap.sources["weights"] == "cli"
    snap = merge_layers(_Nested, [defaults_layer(_Nested), cli_layer(["weights.head=7"])])
    assert snap.sources["weights"] == "cli"
    assert snap.sources["extra"] == "defaults"


def test_a_key_of_a_mapping_replaces_a_mapping_below_it() -> None:
    cli = cli_layer(['extra.opt={"beta": 0.5}'])
    snap = merge_layers(_Nested, [defaults_layer(_Nested), cli])
    assert snap.flat["extra"] == {"opt": {"beta": 0.5}, "n": 1}
    snap = merge_layers(_Nested, [defaults_layer(_Nested), cli_layer(["extra.opt=null"])])
    assert snap.flat["extra"] == {"opt": None, "n": 1}


def test_an_error_inside_a_mapping_blames_the_layer_of_the_key_inside_it() -> None:
    with pytest.raises(InvalidChange) as info:
        merge_layers(_Nested, [defaults_layer(_Nested), cli_layer(['by.one.a="nope"'])])
    assert [(p.key, p.layer) for p in info.value.problems] == [("by.one.a", "cli")]


def test_a_key_below_a_section_that_is_none_by_default_starts_it() -> None:
    snap = merge_layers(_Nested, [defaults_layer(_Nested), cli_layer(["opt.a=3"])])
    assert snap.flat["opt"] == {"a": 3, "b": "x"}


class _Inner(BaseModel):
    a: int = 1
    b: str = "x"


class _SectionDefaults(BaseModel):
    given: _Inner = _Inner(a=7, b="seven")  # a default instance
    made: _Inner = Field(default_factory=lambda: _Inner(a=9))
    plain: _Inner = Field(default_factory=_Inner)


class _Required(BaseModel):
    req: _Inner  # no default: pydantic requires it


def test_a_section_s_own_default_gives_its_leaves_defaults() -> None:
    assert dict(defaults_layer(_SectionDefaults).values) == {
        "given.a": 7,
        "given.b": "seven",
        "made.a": 9,
        "made.b": "x",
        "plain.a": 1,
        "plain.b": "x",
    }
    snap = merge_layers(_SectionDefaults, [defaults_layer(_SectionDefaults)])
    assert snap.flat["given.a"] == _SectionDefaults().given.a == 7


def test_a_required_section_must_be_given() -> None:
    assert dict(defaults_layer(_Required).values) == {}
    with pytest.raises(InvalidChange) as info:
        merge_layers(_Required, [defaults_layer(_Required)])
    assert [p.key for p in info.value.problems] == ["req"]
    snap = merge_layers(_Required, [defaults_layer(_Required), cli_layer(["req.a=2"])])
    assert dict(snap.flat) == {"req.a": 2, "req.b": "x"}


class _Tags(RootModel[list[str]]):
    pass


class _WithRoot(BaseModel):
    lr: float = 0.1
    tags: _Tags = _Tags(["a"])


def test_a_root_model_field_is_one_leaf() -> None:
    snap = merge_layers(_WithRoot, [defaults_layer(_WithRoot), cli_layer(['tags=["x", "y"]'])])
    assert dict(snap.flat) == {"lr": 0.1, "tags": ["x", "y"]}


class _AliasSection(BaseModel):
    lr: float = Field(0.1, alias="LR")


class _Aliased(BaseModel):
    """Fields read by an alias: every layer gives them by name, as every key is one."""

    a: int = Field(1, alias="A")
    v: int = Field(2, validation_alias="vv")
    sec: _AliasSection = Field(default_factory=_AliasSection, alias="Section")
    Top: int = 0  # a field name in upper case


def test_a_field_read_by_an_alias_is_set_by_its_name_in_every_layer() -> None:
    files = files_layer(_Aliased, [(Path("c.yaml"), {"a": 5, "sec": {"lr": 0.7}})])
    snap = merge_layers(_Aliased, [defaults_layer(_Aliased), files, cli_layer(["v=9"])])
    assert dict(snap.flat) == {"a": 5, "v": 9, "sec.lr": 0.7, "Top": 0}
    environ = {"HOTKNOB_PARAM_A": "6", "HOTKNOB_PARAM_SEC__LR": "0.9", "HOTKNOB_PARAM_TOP": "8"}
    # A variable named by an alias alone is no variable of hotknob's (pydantic-settings
    # would read one without the prefix: an alias ``path`` would read ``PATH``).
    env = env_layer(_Aliased, environ={**environ, "A": "77", "LR": "0.5"})
    assert (dict(env.values), env.problems) == ({"a": 6, "sec.lr": 0.9, "Top": 8}, ())
    snap = merge_layers(_Aliased, [defaults_layer(_Aliased), env])
    assert dict(snap.flat) == {"a": 6, "v": 2, "sec.lr": 0.9, "Top": 8}


class _Raw(BaseModel):
    raw: bytes = b"abc"


def test_bytes_that_are_no_utf8_text_are_refused_with_that_reason() -> None:
    files = Layer("files", {"raw": b"\xff\xfe"})  # as YAML's ``!!binary /w==`` gives them
    with pytest.raises(InvalidChange) as info:
        merge_layers(_Raw, [defaults_layer(_Raw), files])
    assert str(info.value) == (
        "raw (from files): cannot be sent to clients: bytes that are not UTF-8 text have no "
        "JSON form"
    )


class _Workers(Enum):
    ONE = 1
    FOUR = 4


class _NumberLike(BaseModel):
    workers: _Workers = _Workers.FOUR
    bits: Literal[8, 16, 32] = 16
    scale: tuple[float, float] = (1.0, 1.0)
    sizes: list[int] = Field(default_factory=lambda: [1])
    weights: dict[str, float] = Field(default_factory=dict)
    mode: Literal["a", 1] = "a"  # takes text too, and pydantic would match true to 1


@pytest.mark.parametrize(
    "given",
    ["workers=true", "bits=false", "scale=[1, true]", "sizes=[2, false]", 'weights={"a": true}'],
)
def test_true_or_false_where_only_numbers_are_taken_is_refused(given: str) -> None:
    key = given.split("=")[0]
    with pytest.raises(InvalidChange) as info:
        merge_layers(_NumberLike, [defaults_layer(_NumberLike), cli_layer([given])])
    assert [(p.key, p.layer) for p in info.value.problems] == [(key, "cli")]
    assert "takes no true/false" in info.value.problems[0].reason


class _MixedArms(BaseModel):
    text_or_number: float | str = "x"
    choice: Literal["fast", "slow", 1, 2] = "fast"
    maybe_number: int | list[int] | None = None
    flag_or_number: bool | float = 1.0
    anything_or_number: Any | float = 1.0


@pytest.mark.parametrize(
    "given", ["text_or_number=true", "choice=true", "mode=true", "maybe_number=false"]
)
def test_true_or_false_that_a_union_or_literal_would_read_as_a_number_is_refused(
    given: str,
) -> None:
    """pydantic reads ``true`` as 1.0 for ``float | str`` (no arm keeps a boolean, the
    float takes it) and as 1 for a ``Literal`` with a member 1: a typo that became a
    number without a word."""
    key = given.split("=")[0]
    schema = _MixedArms if key != "mode" else _NumberLike
    with pytest.raises(InvalidChange) as info:
        merge_layers(schema, [defaults_layer(schema), cli_layer([given])])
    assert [(p.key, p.layer) for p in info.value.problems] == [(key, "cli")]
    assert "takes no true/false" in info.value.problems[0].reason


def test_true_where_an_arm_takes_a_boolean_stays_a_boolean() -> None:
    given = ["flag_or_number=true", "anything_or_number=false", "choice=1", "text_or_number=0.5"]
    snap = merge_layers(_MixedArms, [defaults_layer(_MixedArms), cli_layer(given)])
    values = {k: snap.values[k] for k in ("flag_or_number", "anything_or_number", "choice")}
    assert values == {"flag_or_number": True, "anything_or_number": False, "choice": 1}
    assert type(snap.values["flag_or_number"]) is bool


def test_numbers_where_only_numbers_are_taken_are_fine() -> None:
    given = ["workers=1", "bits=8", "scale=[1, 2]", "sizes=[2, 3]", 'weights={"a": 1}']
    snap = merge_layers(_NumberLike, [defaults_layer(_NumberLike), cli_layer(given)])
    assert snap.flat["scale"] == [1.0, 2.0] and snap.flat["workers"] == 1


def test_an_env_variable_for_a_key_inside_a_mapping_sets_that_key() -> None:
    # As ``--set weights.head=2`` does: the value is JSON text, the rest of the mapping stays.
    env = env_layer(Loose, environ={"HOTKNOB_PARAM_WEIGHTS__HEAD": "2"})
    assert dict(env.values) == {"weights.head": 2}
    defaults = Layer("defaults", {"x": 1.0, "weights": {"head": 1.0, "body": 0.5}})
    snap = merge_layers(Loose, [defaults, env])
    assert snap.flat["weights"] == {"head": 2.0, "body": 0.5}
    # The mapping's own variable gives it whole.
    env = env_layer(Loose, environ={"HOTKNOB_PARAM_WEIGHTS": '{"head": 3}'})
    assert merge_layers(Loose, [defaults, env]).flat["weights"] == {"head": 3.0}


# --- a third review: keys inside leaves ---------------------------------------------------------


class _Band(BaseModel):
    lo: float = 0.0
    hi: float = 1.0

    @model_validator(mode="after")
    def ordered(self) -> _Band:
        if self.lo > self.hi:
            raise ValueError("lo must not exceed hi")
        return self


class _Inside(BaseModel):
    lr: float = 0.1
    weights: dict[str, float] = Field(default_factory=lambda: {"head": 1.0})
    bands: dict[str, _Band] = Field(default_factory=lambda: {"a": _Band(), "b": _Band()})
    opt: Optional[_Band] = None  # noqa: UP045 - the spelling under test
    headW: dict[str, float] = Field(default_factory=lambda: {"a": 1.0, "b": 2.0})


@pytest.mark.parametrize(
    "given", ["weights.head=true", "weights.new=false", "opt.lo=true", 'bands.a={"hi": true}']
)
def test_true_or_false_given_inside_a_leaf_where_a_number_is_taken_is_refused(given: str) -> None:
    with pytest.raises(InvalidChange) as info:
        merge_layers(_Inside, [defaults_layer(_Inside), cli_layer([given])])
    assert [p.key for p in info.value.problems] == [given.split("=")[0]]
    assert "takes no true/false" in info.value.problems[0].reason


def test_a_rule_inside_a_model_a_leaf_holds_blames_the_keys_given_below_it() -> None:
    etcd = Layer("etcd", {"bands.a.hi": 5.0, "bands.b.lo": 3.0, "lr": 0.2})  # b: lo > hi
    with pytest.raises(InvalidChange) as info:
        merge_layers(_Inside, [defaults_layer(_Inside), etcd])
    assert [(p.key, p.layer) for p in info.value.problems] == [("bands.b.lo", "etcd")]
    snap, dropped = merge_dropping_invalid(_Inside, [defaults_layer(_Inside), etcd])
    assert [p.key for p in dropped] == ["bands.b.lo"]  # a.hi and lr stay
    assert snap.flat["bands"]["a"]["hi"] == 5.0 and snap.flat["lr"] == 0.2
    with pytest.raises(InvalidChange) as info:
        merge_layers(_Inside, [defaults_layer(_Inside), cli_layer(["opt.lo=3", "opt.hi=1"])])
    assert [(p.key, p.layer) for p in info.value.problems] == [("opt.lo", "cli"), ("opt.hi", "cli")]


def test_an_env_variable_inside_a_mapping_whose_name_has_upper_case() -> None:
    env = env_layer(_Inside, environ={"HOTKNOB_PARAM_HEADW__A": "5"})
    assert dict(env.values) == {"headW.a": 5}
    snap = merge_layers(_Inside, [defaults_layer(_Inside), env])
    assert snap.flat["headW"] == {"a": 5.0, "b": 2.0}


class _Swapped(BaseModel):
    a: int = Field(1, alias="b")  # an alias that is another field's name
    b: int = 2


def test_an_alias_that_is_another_field_s_name_takes_nothing_of_it() -> None:
    snap = merge_layers(_Swapped, [defaults_layer(_Swapped), cli_layer(["a=10"])])
    assert dict(snap.flat) == {"a": 10, "b": 2}


class _In(BaseModel):
    a: int = 1


class _Outer(BaseModel):
    x: int = 0
    inner: _In = _In(a=5)


class _DictDefault(BaseModel):
    outer: _Outer = {"x": 1}  # type: ignore[assignment]  # a dict default, as pydantic takes


def test_a_section_default_given_as_a_dict_keeps_the_defaults_of_the_sections_inside() -> None:
    assert dict(defaults_layer(_DictDefault).values) == {"outer.x": 1, "outer.inner.a": 5}


def test_a_key_inside_a_mapping_is_shadowed_by_a_higher_layer_s_whole_mapping() -> None:
    etcd = Layer("etcd", {"weights.head": 5.0, "lr": 0.2})
    cli = cli_layer(['weights={"head": 9}'])
    snap = merge_layers(_Inside, [defaults_layer(_Inside), etcd, cli])
    assert snap.shadowing("etcd", "weights.head") == "cli"
    assert snap.shadowing("etcd", "lr") is None and snap.shadowing("cli", "weights") is None
    # A key inside a lower layer's whole mapping shadows nothing of it but that key.
    snap = merge_layers(_Inside, [defaults_layer(_Inside), Layer("etcd", {"weights.x": 1.0})])
    assert snap.shadowing("defaults", "weights") is None
    assert snap.shadowing("defaults", "weights.x") == "etcd"


class _Derived(BaseModel):
    a: int = 1
    lr: float = 0.1
    derived: int = Field(default_factory=lambda data: data["a"] * 2)


def test_a_default_made_from_other_fields_adds_nothing_to_their_errors() -> None:
    with pytest.raises(InvalidChange) as info:
        merge_layers(_Derived, [defaults_layer(_Derived), cli_layer(['lr="x"'])])
    assert [p.key for p in info.value.problems] == ["lr"]
    snap = merge_layers(_Derived, [defaults_layer(_Derived), cli_layer(["a=4"])])
    assert snap.flat["derived"] == 8


@dataclasses.dataclass
class _DataclassInner:
    a: int = 1
    b: float = 0.5


class _WithDataclass(BaseModel):
    inner: _DataclassInner = Field(default_factory=_DataclassInner)


def test_a_dataclass_section_takes_keys_inside_it_as_a_model_does() -> None:
    # As env (``HOTKNOB_PARAM_INNER__A``) already could, ``--set inner.a`` and etcd's
    # ``inner/a`` set a field of a dataclass section; a typo or true for a number is refused.
    snap = merge_layers(_WithDataclass, [defaults_layer(_WithDataclass), cli_layer(["inner.a=4"])])
    assert snap.flat["inner"] == {"a": 4, "b": 0.5}
    assert snap.sources["inner"] == "cli"
    assert is_known(_WithDataclass, "inner.a") and not is_known(_WithDataclass, "inner.c")
    for setting, reason in (("inner.c=4", "not a key"), ("inner.a=true", "true/false")):
        with pytest.raises(InvalidChange, match=reason):
            merge_layers(_WithDataclass, [defaults_layer(_WithDataclass), cli_layer([setting])])


@given(
    key=st.text(max_size=12),
    value=st.one_of(
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.booleans(),
        st.none(),
        st.text(max_size=20),
        st.lists(st.integers(), max_size=3),
    ),
)
def test_entry_bytes_counts_what_state_bytes_counts(key: str, value: Any) -> None:
    assert entry_bytes(key, value) == state_bytes({key: value})
