"""Precedence pair by pair, provenance, coercion and bad input for the config layers."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Optional

import pytest
from pydantic import BaseModel, Field, PositiveFloat

from hotknob.config import (
    DEFAULT_PRECEDENCE,
    InvalidChange,
    LayerError,
    MLParams,
    SchemaLoadError,
    UsageError,
    cli_layer,
    defaults_layer,
    env_layer,
    etcd_layer,
    files_layer,
    load_schema,
    merge_layers,
    parse_precedence,
    read_config_file,
    restart_only_keys,
)
from hotknob.config.bools_as_numbers import numeric_keys
from hotknob.config.dropping_invalid import merge_dropping_invalid
from hotknob.config.keys import parse_text, unflatten
from hotknob.config.merge import leaf_input, validate_leaves
from hotknob.config.schema import TrainParams, mapping_keys
from hotknob.config.sources import Layer
from tests.banded_schema import Banded

APP = "job"


def layer_setting(name: str, key: str, text: str) -> Layer:
    """A layer of kind ``name`` setting ``key`` to JSON ``text``, built by its real source."""
    if name == "defaults":
        return defaults_layer(MLParams)
    if name == "files":
        section, field = key.split(".")
        return files_layer(MLParams, [(Path("c.yaml"), {section: {field: float(text)}})])
    if name == "etcd":
        return etcd_layer(APP, {f"/hotknob/{APP}/config/{key.replace('.', '/')}": text.encode()})
    if name == "env":
        env = {"HOTKNOB_PARAM_" + key.upper().replace(".", "__"): text}
        return env_layer(MLParams, environ=env)
    return cli_layer([f"{key}={text}"])


VALUES = {"defaults": None, "files": "0.2", "etcd": "0.3", "env": "0.4", "cli": "0.5"}


@pytest.mark.parametrize(
    ("low", "high"), list(itertools.pairwise(DEFAULT_PRECEDENCE)), ids=lambda x: x
)
def test_each_adjacent_pair_in_default_order(low: str, high: str) -> None:
    layers = [defaults_layer(MLParams)]
    for name in (low, high):
        if name != "defaults":
            layers.append(layer_setting(name, "train.lr", VALUES[name]))
    snap = merge_layers(MLParams, layers)
    assert snap.sources["train.lr"] == high
    assert snap.flat["train.lr"] == float(VALUES[high])
    assert snap.layers[low]["train.lr"] == (1e-3 if low == "defaults" else float(VALUES[low]))


REORDERED = ("defaults", "env", "cli", "files", "etcd")


@pytest.mark.parametrize(("low", "high"), list(itertools.pairwise(REORDERED)), ids=lambda x: x)
def test_each_adjacent_pair_in_reordered_precedence(low: str, high: str) -> None:
    order = parse_precedence(",".join(REORDERED))
    layers = [defaults_layer(MLParams)]
    layers += [layer_setting(n, "train.lr", VALUES[n]) for n in (low, high) if n != "defaults"]
    snap = merge_layers(MLParams, layers, order)
    assert snap.sources["train.lr"] == high


def test_all_layers_provenance_for_every_key() -> None:
    layers = [
        defaults_layer(MLParams),
        layer_setting("files", "sampling.top_p", "0.8"),
        layer_setting("etcd", "train.lr", "0.01"),
        layer_setting("env", "train.momentum", "0.5"),
        layer_setting("cli", "sampling.temperature", "0"),
    ]
    snap = merge_layers(MLParams, layers)
    assert (
        set(snap.sources)
        == set(snap.flat)
        == {
            "train.lr",
            "train.weight_decay",
            "train.momentum",
            "train.grad_clip",
            "train.warmup_steps",
            "train.batch_size",
            "sampling.temperature",
            "sampling.top_p",
            "sampling.top_k",
            "sampling.min_p",
            "sampling.repetition_penalty",
            "sampling.max_new_tokens",
        }
    )
    assert snap.sources["sampling.top_p"] == "files"
    assert snap.sources["train.lr"] == "etcd"
    assert snap.sources["train.momentum"] == "env"
    assert snap.sources["sampling.temperature"] == "cli"
    assert snap.sources["train.weight_decay"] == "defaults"
    assert snap.values["sampling"]["temperature"] == 0.0


def test_type_coercion_from_json_text() -> None:
    snap = merge_layers(
        MLParams,
        [
            defaults_layer(MLParams),
            cli_layer(["train.warmup_steps=100", "train.grad_clip=null", "sampling.top_k=5"]),
            layer_setting("env", "train.lr", "3e-4"),
        ],
    )
    assert snap.flat["train.warmup_steps"] == 100
    assert snap.flat["train.grad_clip"] is None
    assert snap.flat["sampling.top_k"] == 5
    assert snap.flat["train.lr"] == pytest.approx(3e-4)


def test_later_file_wins_key_by_key(tmp_path: Path) -> None:
    a = tmp_path / "a.yaml"
    a.write_text("train:\n  lr: 0.1\n  momentum: 0.5\n")
    b = tmp_path / "b.toml"
    b.write_text("[train]\nlr = 0.2\n")
    c = tmp_path / "c.json"
    c.write_text('{"sampling": {"top_k": 7}}')
    files = [(p, read_config_file(p)) for p in (a, b, c)]
    snap = merge_layers(MLParams, [defaults_layer(MLParams), files_layer(MLParams, files)])
    assert snap.flat["train.lr"] == 0.2
    assert snap.flat["train.momentum"] == 0.5
    assert snap.flat["sampling.top_k"] == 7


@pytest.mark.parametrize(
    ("assignment", "fragment"),
    [
        ("train.lr=-1", "greater than 0"),
        ("train.lr=banana", "valid number"),
        ("sampling.top_p=2.0", "less than or equal to 1"),
        ("train.momentum=1", "less than 1"),
        ("train.batch_size=0", "greater than 0"),
        ("sampling.top_k=1.5", "valid integer"),
        ("train.lr=NaN", "finite number"),
        ("train.lr=[1]", "valid number"),
        ("train.lr=true", "true/false"),  # pydantic alone would read it as 1.0
        ("sampling.top_k=false", "true/false"),
        ("train.grad_clip=true", "true/false"),  # an optional number
    ],
)
def test_invalid_values_name_key_and_layer(assignment: str, fragment: str) -> None:
    with pytest.raises(InvalidChange) as info:
        merge_layers(MLParams, [defaults_layer(MLParams), cli_layer([assignment])])
    problem = info.value.problems[0]
    assert problem.key == assignment.split("=")[0]
    assert problem.layer == "cli"
    assert fragment in problem.reason


def test_only_leaves_that_take_numbers_alone_refuse_true_and_false() -> None:
    class Flags(BaseModel):
        scale: float = 1.0
        steps: int = 1
        limit: Optional[PositiveFloat] = None  # noqa: UP045 (the form schemas are written in)
        either: float | str = 1.0
        on: bool = False
        anything: Any = None

    assert {"scale", "steps", "limit"} <= set(numeric_keys(Flags)) and "on" not in numeric_keys(
        Flags
    )
    for key in ("on", "anything"):  # an arm that keeps a boolean: true passes, as true
        snap = merge_layers(Flags, [defaults_layer(Flags), cli_layer([f"{key}=true"])])
        assert snap.flat[key] is True  # ``is``: 1.0 == True, and pydantic made 1.0 of it
    given = ["scale=true", "limit=false", "either=true"]  # ``float | str``: the float takes it
    with pytest.raises(InvalidChange) as info:
        merge_layers(Flags, [defaults_layer(Flags), cli_layer(given)])
    assert sorted(p.key for p in info.value.problems) == ["either", "limit", "scale"]


def test_unknown_key_from_each_layer_is_named() -> None:
    for layer in (
        etcd_layer(APP, {f"/hotknob/{APP}/config/train/bogus": b"1"}),
        cli_layer(["nosuch.key=1"]),
        files_layer(MLParams, [(Path("x.yaml"), {"train": {"lr": 0.1, "typo": 1}})]),
    ):
        with pytest.raises(InvalidChange) as info:
            merge_layers(MLParams, [defaults_layer(MLParams), layer])
        assert info.value.problems[0].layer == layer.name
        assert "not a key of the schema" in str(info.value)


def test_env_var_naming_no_field_is_reported() -> None:
    layer = env_layer(MLParams, environ={"HOTKNOB_PARAM_TRIAN__LR": "0.1"})
    with pytest.raises(InvalidChange, match="HOTKNOB_PARAM_TRIAN__LR names no field"):
        merge_layers(MLParams, [defaults_layer(MLParams), layer])


@pytest.mark.parametrize(
    ("layer", "reason"),
    [
        (cli_layer(["train=5"]), "a section, not one value: set its keys (train.batch_size, "),
        (files_layer(MLParams, [(Path("c.yaml"), {"train": None})]), "a section given nothing"),
        (cli_layer(["trian=5"]), "not a key of the schema"),
    ],
    ids=["value", "nothing", "typo"],
)
def test_a_section_given_a_value_is_said_to_be_a_section(layer: Layer, reason: str) -> None:
    with pytest.raises(InvalidChange) as info:
        merge_layers(MLParams, [defaults_layer(MLParams), layer])
    assert reason in str(info.value)


class _Weighted(BaseModel):
    train: TrainParams = Field(default_factory=TrainParams)
    weights: dict[str, float] = Field(default_factory=dict)


@pytest.mark.parametrize(
    ("schema", "name", "said"),
    [
        (MLParams, "HOTKNOB_PARAM_TRAIN", "HOTKNOB_PARAM_TRAIN (train): not valid JSON: "),
        (_Weighted, "hotknob_param_weights", "hotknob_param_weights (weights): not valid JSON: "),
    ],
    ids=["section", "mapping"],
)
def test_an_env_variable_read_as_json_that_is_not_names_itself_and_its_key(
    schema: type[BaseModel], name: str, said: str
) -> None:
    with pytest.raises(LayerError) as info:
        env_layer(schema, environ={name: '{"lr": 0.1'})
    assert str(info.value).startswith(said), str(info.value)
    assert "0.1" not in str(info.value)  # the value is not quoted: it may be a secret


def test_two_env_variables_that_differ_only_in_case_are_refused() -> None:
    for environ in (
        {"HOTKNOB_PARAM_TRAIN__LR": "0.4", "hotknob_param_train__lr": "0.5"},
        {"hotknob_param_train__lr": "0.5", "HOTKNOB_PARAM_TRAIN__LR": "0.4"},
    ):
        layer = env_layer(MLParams, environ=environ)
        with pytest.raises(InvalidChange, match=r"train.lr \(from env\): .* both set it"):
            merge_layers(MLParams, [defaults_layer(MLParams), layer])


def test_etcd_value_not_utf8_is_a_problem() -> None:
    layer = etcd_layer(APP, {f"/hotknob/{APP}/config/train/lr": b"\xff\xfe"})
    with pytest.raises(InvalidChange, match=r"train.lr \(from etcd\): value is not valid UTF-8"):
        merge_layers(MLParams, [defaults_layer(MLParams), layer])


def test_etcd_keys_outside_prefix_are_ignored() -> None:
    layer = etcd_layer(APP, {"/hotknob/other/config/train/lr": b"5", "/elsewhere": b"x"})
    assert dict(layer.values) == {}


def test_a_value_nested_too_deeply_to_decode_is_a_string_the_schema_rejects() -> None:
    deep = "[" * 50_000
    assert parse_text(deep) == deep
    for layer in (
        cli_layer([f"train.lr={deep}"]),
        env_layer(MLParams, environ={"HOTKNOB_PARAM_TRAIN__LR": deep}),
        etcd_layer(APP, {f"/hotknob/{APP}/config/train/lr": deep.encode()}),
    ):
        with pytest.raises(InvalidChange) as info:
            merge_layers(MLParams, [defaults_layer(MLParams), layer])
        (problem,) = info.value.problems
        assert (problem.key, problem.layer) == ("train.lr", layer.name)
        assert "valid number" in problem.reason


def test_a_key_below_a_leaf_that_is_no_mapping_is_not_a_key_of_the_schema() -> None:
    etcd = etcd_layer(APP, {f"/hotknob/{APP}/config/train/lr/x": b"1"})
    with pytest.raises(InvalidChange) as info:
        merge_layers(MLParams, [defaults_layer(MLParams), etcd])
    (problem,) = info.value.problems
    assert (problem.key, problem.layer) == ("train.lr.x", "etcd")
    assert problem.reason == "not a key of the schema"
    snap, dropped = merge_dropping_invalid(MLParams, [defaults_layer(MLParams), etcd])
    assert snap.flat["train.lr"] == 0.001 and [p.key for p in dropped] == ["train.lr.x"]


def test_a_key_below_a_mapping_leaf_clashing_with_a_non_mapping_names_both() -> None:
    cli = cli_layer(["weights.head=0.5"])
    etcd = Layer("etcd", {"weights": "x"})  # a non-mapping where the cli reaches inside
    with pytest.raises(InvalidChange) as info:
        merge_layers(Loose, [defaults_layer(Loose), etcd, cli])
    found = {(p.key, p.layer, p.reason) for p in info.value.problems}
    assert found == {
        ("weights.head", "cli", "conflicts with weights (from etcd)"),
        ("weights", "etcd", "conflicts with weights.head (from cli)"),
    }
    snap, dropped = merge_dropping_invalid(Loose, [defaults_layer(Loose), etcd, cli])
    assert snap.flat["weights"] == {"head": 0.5}
    assert [(p.key, p.layer) for p in dropped] == [("weights", "etcd")]


class Tagged(BaseModel):
    tags: dict[str, int] = Field(default_factory=dict)


def test_a_boolean_below_a_mapping_given_a_text_names_both_keys() -> None:
    """``tags`` a text and ``tags.x`` a boolean in one layer (one etcd revision): the
    boolean is at fault on its own, and the rest is validated without it, which blamed
    the keys given below ``tags`` and looked up the one already left out (a KeyError out
    of the merge, found by the short path's property test)."""
    etcd = Layer("etcd", {"tags": "fast", "tags.x": True})
    with pytest.raises(InvalidChange) as info:
        merge_layers(Tagged, [defaults_layer(Tagged), etcd])
    found = {(p.key, p.layer) for p in info.value.problems}
    assert found == {("tags.x", "etcd"), ("tags", "etcd")}, info.value.problems
    snap, dropped = merge_dropping_invalid(Tagged, [defaults_layer(Tagged), etcd])
    assert snap.flat["tags"] == {} and {p.key for p in dropped} == {"tags", "tags.x"}


def test_a_broken_rule_across_fields_drops_the_live_keys_behind_it() -> None:
    defaults = defaults_layer(Banded)
    etcd = Layer("etcd", {"band.lo": 5.0, "steps": 3})  # lo > hi: pydantic blames "band"
    dropped_rounds: list[list[str]] = []
    snap, dropped = merge_dropping_invalid(
        Banded,
        [defaults, etcd],
        on_drop=lambda exc, problems: dropped_rounds.append([p.key for p in problems]),
    )
    assert snap.flat == {"band.lo": 0.0, "band.hi": 1.0, "steps": 3}
    assert [(p.key, p.layer, p.value) for p in dropped] == [("band.lo", "etcd", 5.0)]
    assert "lo must not exceed hi" in dropped[0].reason
    assert dropped_rounds == [["band.lo"]]

    # A rule over the whole model names no section: every key of the live layer goes.
    wide = Layer("etcd", {"band.hi": 20.0, "steps": 9})
    snap, dropped = merge_dropping_invalid(Banded, [defaults, wide])
    assert snap.flat["steps"] == 1 and sorted(p.key for p in dropped) == ["band.hi", "steps"]

    # Broken without the live layer too: not its fault, and nothing of it is dropped.
    cli = cli_layer(["band.lo=5"])
    with pytest.raises(InvalidChange, match="lo must not exceed hi"):
        merge_dropping_invalid(Banded, [defaults, etcd, cli])


def test_which_leaves_hold_a_mapping() -> None:
    class Section(BaseModel):
        a: int = 1

    class Schema(BaseModel):
        plain: float = 1.0
        words: list[dict[str, int]] = []
        table: dict[str, int] = {}
        maybe_table: Optional[dict[str, int]] = None  # noqa: UP045 (the typing form, too)
        maybe_section: Section | None = None
        section: Section = Section()

    assert mapping_keys(Schema) == {"table", "maybe_table", "maybe_section"}


def test_malformed_set_is_a_usage_error() -> None:
    for bad in ("train.lr", "=1", "train..lr=1"):
        with pytest.raises(UsageError):
            cli_layer([bad])


def test_bare_word_is_a_string_where_the_schema_wants_one() -> None:
    from pydantic import BaseModel

    class Opt(BaseModel):
        name: str = "adam"
        lr: float = 0.1

    class Schema(BaseModel):
        opt: Opt = Opt()

    snap = merge_layers(Schema, [defaults_layer(Schema), cli_layer(["opt.name=cosine"])])
    assert snap.flat["opt.name"] == "cosine"
    snap = merge_layers(Schema, [defaults_layer(Schema), cli_layer(['opt.name="1e-3"'])])
    assert snap.flat["opt.name"] == "1e-3"


def test_precedence_must_name_every_layer_once() -> None:
    for bad in ("defaults,files,etcd,env", "defaults,files,etcd,env,cli,cli", "a,b,c,d,e"):
        with pytest.raises(UsageError):
            parse_precedence(bad)


def test_restart_only_marker() -> None:
    assert restart_only_keys(MLParams) == {"train.batch_size"}


def test_load_schema_errors() -> None:
    assert load_schema("hotknob.config.schema:MLParams") is MLParams
    with pytest.raises(SchemaLoadError, match="cannot import"):
        load_schema("no_such_module_xyz:Thing")
    with pytest.raises(SchemaLoadError, match="has no"):
        load_schema("hotknob.config.schema:Nope")
    with pytest.raises(SchemaLoadError, match="not a pydantic model"):
        load_schema("hotknob.config.schema:load_schema")
    with pytest.raises(SchemaLoadError, match="must look like"):
        load_schema("justamodule")


def test_snapshot_holds_real_secret_values_and_mask_hides_them() -> None:
    from hotknob.config.secrecy import SECRET_MASK, mask_secrets, secret_keys
    from tests.secret_schema import Params

    snap = merge_layers(
        Params, [defaults_layer(Params), cli_layer(["service.api_key=a-long-secret-value"])]
    )
    assert snap.flat["service.api_key"] == "a-long-secret-value"
    assert snap.values["service"]["api_key"] == "a-long-secret-value"
    masked = mask_secrets(snap.flat, secret_keys(Params))
    assert masked["service.api_key"] == SECRET_MASK


def test_unflatten_copies_mappings_it_merges_into() -> None:
    whole = {"a": 1, "deep": {"b": 2}}
    nested = unflatten({"tags": whole, "tags.c": 3, "tags.deep.d": 4})
    assert nested == {"tags": {"a": 1, "deep": {"b": 2, "d": 4}, "c": 3}}
    assert whole == {"a": 1, "deep": {"b": 2}}  # the layer's own value is not edited


class Loose(BaseModel):
    """A schema whose floats accept NaN and infinity, as pydantic's do by default."""

    x: float = 1.0
    weights: dict[str, float] = Field(default_factory=dict)


@pytest.mark.parametrize(
    ("values", "key"),
    [({"x": "NaN"}, "x"), ({"x": 1e999}, "x"), ({"weights": {"a": "-Infinity"}}, "weights")],
)
def test_a_value_no_client_could_be_sent_is_rejected(values: dict[str, Any], key: str) -> None:
    with pytest.raises(InvalidChange) as caught:
        merge_layers(Loose, [defaults_layer(Loose), Layer("etcd", values)])
    (problem,) = caught.value.problems
    assert (problem.key, problem.layer) == (key, "etcd")
    assert "finite" in problem.reason


def test_leaf_input_with_leaves_copies_only_the_sections_it_changes() -> None:
    layers = {
        "defaults": defaults_layer(MLParams),
        "etcd": Layer("etcd", {"train.lr": 0.5}),
    }
    base = leaf_input(MLParams, layers, DEFAULT_PRECEDENCE)
    assert base is not None and base.nested["train"]["lr"] == 0.5
    changed = base.with_leaves(MLParams, {"train.lr": 0.25, "train.momentum": 0.5})
    assert changed.nested["train"]["lr"] == 0.25 and changed.nested["train"]["momentum"] == 0.5
    assert base.nested["train"]["lr"] == 0.5  # the input it came from is not edited
    assert changed.nested["sampling"] is base.nested["sampling"]  # untouched: shared
    assert (
        validate_leaves(MLParams, changed)[2]
        == merge_layers(
            MLParams, [*layers.values(), Layer("cli", {"train.lr": 0.25, "train.momentum": 0.5})]
        ).flat
    )


def test_leaf_input_is_none_when_a_layer_holds_more_than_leaves() -> None:
    inside = Layer("etcd", {"train": {"lr": 0.1}})  # a section given whole, not a leaf
    assert leaf_input(MLParams, {"etcd": inside}, DEFAULT_PRECEDENCE) is None


class _Open(BaseModel):
    """Leaves that hold a mapping: a dict, and ``Any``."""

    w: dict[str, Any] = Field(default_factory=lambda: {"head": 1.0})
    extra: Any = Field(default_factory=dict)
    prompt: str = ""
    note: str = ""
    lr: float = 0.1


def test_keys_below_an_any_leaf_are_keys_of_the_schema() -> None:
    etcd = Layer("etcd", {"extra.dropout": 0.1})
    snap = merge_layers(_Open, [defaults_layer(_Open), etcd])
    assert snap.flat["extra"] == {"dropout": 0.1}


def test_a_clash_inside_a_mapping_leaf_names_the_leaf_and_drops_the_live_key() -> None:
    etcd = Layer("etcd", {"w.head.x": 2.0, "lr": 0.5})  # w.head holds 1.0, not a mapping
    with pytest.raises(InvalidChange) as info:
        merge_layers(_Open, [defaults_layer(_Open), etcd])
    assert {(p.key, p.layer) for p in info.value.problems} == {
        ("w.head.x", "etcd"),
        ("w", "defaults"),
    }
    snap, dropped = merge_dropping_invalid(_Open, [defaults_layer(_Open), etcd])
    assert [p.key for p in dropped] == ["w.head.x"] and snap.flat["lr"] == 0.5


def test_a_state_too_large_blames_the_value_a_live_layer_set() -> None:
    from hotknob.config.sendable import MAX_STATE_BYTES

    defaults = Layer("defaults", {**defaults_layer(_Open).values, "prompt": "p" * 300_000})
    etcd = Layer("etcd", {"note": "n" * (MAX_STATE_BYTES - 250_000), "lr": 0.5})
    with pytest.raises(InvalidChange) as info:
        merge_layers(_Open, [defaults, etcd])
    ((key, layer),) = {(p.key, p.layer) for p in info.value.problems}
    assert (key, layer) == ("note", "etcd")  # not the larger default: it cannot be dropped
    snap, dropped = merge_dropping_invalid(_Open, [defaults, etcd])
    assert [p.key for p in dropped] == ["note"] and snap.flat["lr"] == 0.5
