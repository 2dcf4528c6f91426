"""Precedence pair by pair, provenance, coercion and bad input for the config layers."""

from __future__ import annotations

import dataclasses
import itertools
from enum import Enum
from pathlib import Path
from typing import Any, Literal, Optional

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, Field, PositiveFloat, RootModel, model_validator

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
from hotknob.config.files import MAX_FILE_DEPTH
from hotknob.config.keys import etcd_key, key_from_etcd, key_path_fault, parse_text, unflatten
from hotknob.config.merge import leaf_input, validate_leaves
from hotknob.config.schema import TrainParams, mapping_keys
from hotknob.config.schema_facts import is_known
from hotknob.config.sendable import entry_bytes, state_bytes
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


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("empty.yaml", b"", "file is empty"),
        ("blank.json", b"   \n", "file is empty"),
        ("bad.yaml", b"train: [1, 2\n", "not valid YAML"),
        ("bad.json", b'{"train": ', "not valid JSON"),
        ("bad.toml", b"[train\nlr=1", "not valid TOML"),
        ("latin1.yaml", "train:\n  lr: 0.1 # caf\xe9\n".encode("latin-1"), "not valid UTF-8"),
        ("list.yaml", b"- 1\n- 2\n", "top level must be a mapping"),
        ("comments.yaml", b"# train:\n#   lr: 0.1\n", "no values in it (only comments)"),
        ("dup.yaml", b"train:\n  lr: 1\n  lr: 2\n", "duplicate key"),
        ("dup.json", b'{"train": {"lr": 1, "lr": 2}}', "duplicate key"),
        ("dotted.json", b'{"train": {"lr": 1}, "train.lr": 2}', "duplicate key 'train.lr'"),
        ("dotted.yaml", b"train.lr: 2\ntrain:\n  lr: 1\n", "duplicate key 'train.lr'"),
        ("dotted.toml", b'"train.lr" = 2\n[train]\nlr = 1\n', "duplicate key 'train.lr'"),
        ("alias.yaml", b"a: &x [1]\nb: *x\n", "aliases are not allowed"),
        ("nan.json", b'{"train": {"lr": NaN}}', "not allowed"),
        ("unhashable.yaml", b"? [a, b]\n: 1\n", "found unhashable key"),
        ("unhashable-set.yaml", b"train: !!set {? {a: 1}}\n", "found unhashable key"),
        ("deep.json", ('{"a":' * 990 + "1" + "}" * 990).encode(), "nested too deeply"),
        ("deep.yaml", b"a:\n" + b"".join(b"  " * i + b"- \n" for i in range(1, 70)), "deeply"),
        ("conf.ini", b"[train]\n", "unknown config format"),
    ],
)
def test_unreadable_files_get_a_clear_error(
    tmp_path: Path, name: str, content: bytes, fragment: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(LayerError) as info:
        read_config_file(path)
    assert str(path) in str(info.value)
    assert fragment in str(info.value)
    assert info.value.layer == "files"


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("bom.yaml", b"train:\n  lr: 0.5\n"),
        ("bom.json", b'{"train": {"lr": 0.5}}'),
        ("bom.toml", b"[train]\nlr = 0.5\n"),
    ],
)
def test_a_byte_order_mark_is_read_past_in_every_format(
    tmp_path: Path, name: str, content: bytes
) -> None:
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + content)
    assert read_config_file(path) == {"train": {"lr": 0.5}}


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(LayerError, match="no such file"):
        read_config_file(tmp_path / "nope.yaml")


def test_deeply_nested_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(LayerError):
        read_config_file(path)


def test_nesting_up_to_the_limit_is_read_and_beyond_it_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"a":' * (MAX_FILE_DEPTH - 1) + "[1]" + "}" * (MAX_FILE_DEPTH - 1))
    assert read_config_file(path)["a"]["a"]
    path.write_text('{"a":' * (MAX_FILE_DEPTH - 1) + "[[1]]" + "}" * (MAX_FILE_DEPTH - 1))
    with pytest.raises(LayerError, match=f"more than {MAX_FILE_DEPTH} levels"):
        read_config_file(path)


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
