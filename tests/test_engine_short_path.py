"""The engine's short path for a lone etcd change (``Engine._take_puts``).

A change that only puts values at leaves no layer above etcd sets is validated and
pushed before the etcd layer, the snapshot and the reports are built. It must be the
same change the general path makes: the same versions, published states, snapshot,
layers, saved state and events, for every sequence of changes, valid or not. The
general path is what a group of changes takes (``on_etcd_changes``), so the two are
compared side by side.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from structlog.testing import capture_logs

from hotknob.config import cli_layer, defaults_layer, env_layer, files_layer
from hotknob.config.merge import DEFAULT_PRECEDENCE
from hotknob.daemon import engine as engine_module
from hotknob.daemon.engine import Engine
from hotknob.daemon.published import Published
from hotknob.daemon.state import VERSION_BLOCK, StateStore

APP = "short"
P = f"/hotknob/{APP}/config/"


class Band(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lo: float = Field(0.0, ge=0)
    hi: float = 1.0
    token: SecretStr = Field(SecretStr("default-token"), min_length=4)

    @model_validator(mode="after")
    def ordered(self) -> Band:
        if self.lo > self.hi:
            raise ValueError("lo must not exceed hi")
        return self


class Opts(BaseModel):
    """No rule across fields: each value is validated alone (``config.leafwise``)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, allow_inf_nan=False)

    mode: Literal["fast", "slow"] = "fast"
    rate: float | None = Field(None, gt=0)
    label: str = Field("x", max_length=5)


class Params(BaseModel):
    """Cross-field rules, a secret, a restart-only key, a dict-typed field, and a section
    whose values are validated alone."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    band: Band = Field(default_factory=Band)
    opts: Opts = Field(default_factory=Opts)
    steps: int = Field(1, ge=1)
    workers: int = Field(1, ge=1, json_schema_extra={"live": False})
    tags: dict[str, int] = Field(default_factory=dict)


PATHS = [
    "band/lo",
    "band/hi",
    "band/token",
    "opts/mode",
    "opts/rate",
    "opts/label",
    "steps",
    "workers",
    "tags",
    "tags/x",
    "nope",
]
RAWS = [
    b'"fast"',
    b'" slow "',
    b"null",
    b"0",
    b"0.5",
    b"2",
    b"-1",
    b"7",
    b'"long-token"',
    b'"ab"',
    b'{"a": 1}',
    b"NaN",
    b"\xff",
    b"true",
]


def make(
    tmp: Path,
    environ: dict[str, str],
    published: list[Published],
    schema: type[BaseModel] = Params,
) -> Engine:
    events: list[dict[str, Any]] = []
    engine = Engine(
        schema=schema,
        app=APP,
        precedence=DEFAULT_PRECEDENCE,
        layers=[
            defaults_layer(schema),
            env_layer(schema, environ=environ),
            cli_layer([]),
            files_layer(schema, []),
        ],
        store=StateStore(tmp, APP),
        publish=published.append,
        broadcast=events.append,
    )
    engine.events = events  # type: ignore[attr-defined]
    return engine


def seen(engine: Engine, published: list[Published]) -> str:
    """Everything a change leaves behind, comparable between two engines (as JSON text:
    a rejected NaN is reported as NaN, which is not equal to itself)."""
    snapshot = engine.snapshot
    assert snapshot is not None
    events = [{k: v for k, v in e.items() if k != "time"} for e in engine.events]  # type: ignore[attr-defined]
    return json.dumps(
        {
            "published": [(p.version, p.revision, p.values, p.sources, p.flat) for p in published],
            "snapshot": (
                snapshot.model.model_dump(mode="json"),
                type(snapshot.model).__name__,
                dict(snapshot.values),
                dict(snapshot.flat),
                dict(snapshot.sources),
                {name: dict(values) for name, values in snapshot.layers.items()},
            ),
            "layers": {
                name: (dict(lay.values), dict(lay.origins)) for name, lay in engine.layers.items()
            },
            "version": (engine.version, engine.revision),
            "pending": dict(engine.pending_restart),
            "events": events,
        },
        sort_keys=True,
        default=repr,
    )


def saved(engine: Engine) -> Any:
    assert engine._keeper is not None and engine.store is not None
    engine._keeper.flush()
    state = engine.store.load()
    assert state is not None
    return (state.version, state.revision, dict(state.values), dict(state.etcd))


GOOD = {
    "band/lo": [b"0", b"0.25", b"0.5"],
    "band/hi": [b"0.5", b"2", b"7"],
    "band/token": [b'"long-token"', b'"other-token"'],
    "opts/mode": [b'"fast"', b'"slow"', b'"slow "'],
    "opts/rate": [b"0.5", b"2", b"null", b"0"],
    "opts/label": [b'"ab"', b'" ab "', b'"toolong"'],
    "steps": [b"2", b"3", b"7"],
    "tags": [b'{"a": 1}', b"{}"],
}
usual = st.sampled_from(sorted(GOOD)).flatmap(
    lambda path: st.tuples(
        st.sampled_from(GOOD[path]).map(lambda raw: {path: raw}), st.just(set[str]())
    )
)
anything = st.tuples(
    st.dictionaries(st.sampled_from(PATHS), st.sampled_from(RAWS), max_size=2),
    st.sets(st.sampled_from(PATHS), max_size=1),
)
change = st.one_of(usual, usual, anything)  # mostly the usual change, which may take it


def general_only(engine: Engine) -> Engine:
    """``engine`` with the short path turned off: the reference the short path must match."""
    engine._take_puts = lambda revision, puts: False  # type: ignore[method-assign]
    return engine


Changes = list[tuple[dict[str, bytes], set[str]]]


def side_by_side(
    tmp: Path, schema: type[BaseModel] = Params
) -> tuple[tuple[Engine, list[Published]], tuple[Engine, list[Published]]]:
    """An engine with the short path and one without it, each started with no etcd
    values, with what each publishes."""
    short_out: list[Published] = []
    general_out: list[Published] = []
    short = make(tmp / "short", {}, short_out, schema)
    general = general_only(make(tmp / "general", {}, general_out, schema))
    for engine in (short, general):
        engine.start({}, 1)
    return (short, short_out), (general, general_out)


def as_events(changes: Changes) -> list[tuple[int, dict[str, bytes], frozenset[str]]]:
    return [
        (revision, {P + path: raw for path, raw in puts.items()}, frozenset(P + p for p in gone))
        for revision, (puts, gone) in enumerate(changes, start=2)
    ]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(changes=st.lists(change, min_size=1, max_size=12), shadow=st.booleans())
def test_short_path_does_what_the_general_path_does(
    tmp_path_factory: pytest.TempPathFactory, changes: Changes, shadow: bool
) -> None:
    environ = {"HOTKNOB_PARAM_BAND__HI": "3"} if shadow else {}
    short_out: list[Published] = []
    general_out: list[Published] = []
    short = make(tmp_path_factory.mktemp("short"), environ, short_out)
    general = general_only(make(tmp_path_factory.mktemp("general"), environ, general_out))
    for engine in (short, general):
        engine.start({P + "steps": b"2"}, 1)
    for revision, puts, gone in as_events(changes):
        short.on_etcd_change(revision, puts, gone)
        general.on_etcd_change(revision, puts, gone)
        assert seen(short, short_out) == seen(general, general_out)
    assert saved(short) == saved(general)
    short.close()
    general.close()


def test_a_restart_only_value_put_earlier_in_a_group_is_not_published(
    tmp_path: Path,
) -> None:
    """In one group: ``workers`` (restart-only) is merged but not yet reported pending
    when ``opts.label`` comes; validated alone on the merged values, the label's state
    carried the new ``workers`` to clients while its flat values held the running one."""
    events = as_events([({"workers": b"2"}, set()), ({"opts/label": b'"ab"'}, set())])
    (short, short_out), (general, general_out) = side_by_side(tmp_path)
    for engine in (short, general):
        engine.on_etcd_changes(events)
    assert short_out[-1].values["workers"] == 1 and short_out[-1].flat["opts.label"] == "ab"
    assert seen(short, short_out) == seen(general, general_out)
    short.close()
    general.close()


def test_a_value_validated_alone_then_deleted_is_gone_from_the_next_whole_validation(
    tmp_path: Path,
) -> None:
    """``opts.label`` is validated alone and kept out of the short path's input until a
    whole validation needs it; deleted in between (the general path), it must not come
    back when ``band.lo`` is validated with the whole model."""
    changes: Changes = [
        ({"opts/label": b'"ab"'}, set()),
        ({}, {"opts/label"}),
        ({"band/lo": b"0.5"}, set()),
    ]
    (short, short_out), (general, general_out) = side_by_side(tmp_path)
    for revision, puts, gone in as_events(changes):
        short.on_etcd_change(revision, puts, gone)
        general.on_etcd_change(revision, puts, gone)
    assert short_out[-1].flat["opts.label"] == "x"  # the default again
    assert seen(short, short_out) == seen(general, general_out)
    short.close()
    general.close()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(changes=st.lists(change, min_size=1, max_size=12), cut=st.integers(0, 12))
def test_a_group_on_the_short_path_does_what_the_general_path_does(
    tmp_path_factory: pytest.TempPathFactory, changes: Changes, cut: int
) -> None:
    """A burst: each revision on its own, one push per group, at its end."""
    short_out: list[Published] = []
    general_out: list[Published] = []
    short = make(tmp_path_factory.mktemp("short"), {}, short_out)
    general = general_only(make(tmp_path_factory.mktemp("general"), {}, general_out))
    events = as_events(changes)
    for engine in (short, general):
        engine.start({P + "steps": b"2"}, 1)
        engine.on_etcd_changes(events[:cut])
        engine.on_etcd_changes(events[cut:])
    assert seen(short, short_out) == seen(general, general_out)
    assert saved(short) == saved(general)
    short.close()
    general.close()


def short_path_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the general path fail loudly: what still works took the short path."""

    def no_merge(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the general merge ran")

    monkeypatch.setattr(engine_module, "merge_layers", no_merge)


def test_a_lone_valid_put_takes_the_short_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    published: list[Published] = []
    engine = make(tmp_path, {}, published)
    engine.start({}, 1)
    short_path_only(monkeypatch)
    with capture_logs() as logs:
        engine.on_etcd_change(2, {P + "band/lo": b"0.5", P + "band/token": b'"long-token"'}, [])
    assert engine.version == 2 and published[-1].flat["band.lo"] == 0.5
    assert published[-1].values["band"]["token"] == "long-token"  # clients get the secret
    assert published[-1].sources["band.lo"] == "etcd"
    assert engine.layers["etcd"].origins["band.lo"] == P + "band/lo"
    accepted = [e for e in logs if e["event"] == "change_accepted"]
    assert accepted and accepted[0]["version"] == 2
    assert accepted[0]["new"]["band.token"] != "long-token"  # the log masks it


def test_a_lone_plain_put_takes_the_lone_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One plain value put at a leaf validated alone: neither the merge nor the short
    path's loop over the puts (``validate_puts``) runs, and the change is the same."""
    published: list[Published] = []
    engine = make(tmp_path, {}, published)
    engine.start({}, 1)
    short_path_only(monkeypatch)

    def no_loop(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("validate_puts ran")

    monkeypatch.setattr("hotknob.daemon.short_path.validate_puts", no_loop)
    with capture_logs() as logs:
        engine.on_etcd_change(2, {P + "opts/rate": b"0.5"}, frozenset())
        engine.on_etcd_change(3, {P + "opts/label": b'" ab "'}, frozenset())
        engine.on_etcd_change(4, {P + "steps": b"7"}, frozenset())
    assert engine.version == 4
    assert published[-1].flat["opts.rate"] == 0.5
    assert published[-1].flat["opts.label"] == "ab"  # the model's config strips it
    assert published[-1].values["steps"] == 7
    assert published[-1].sources["opts.label"] == "etcd"
    assert engine.layers["etcd"].origins["opts.rate"] == P + "opts/rate"
    assert engine.snapshot is not None and engine.snapshot.model.opts.rate == 0.5
    accepted = [e for e in logs if e["event"] == "change_accepted"]
    assert [e["version"] for e in accepted] == [2, 3, 4]
    assert saved(engine)[2]["opts"]["rate"] == 0.5


LONE_RAWS = [
    b"true",
    b"false",
    b"null",
    b"NaN",
    b"1e999",
    b"-1",
    b"0",
    b"0.5",
    b"7",
    b"\xff",
    b'"\\ud800"',
    b'"fast"',
    b'" slow "',
    b'"toolong"',
    b"[1]",
    b'{"a": 1}',
]


@pytest.mark.parametrize("path", ["opts/rate", "opts/label", "opts/mode", "steps", "workers"])
def test_each_lone_put_ends_as_on_the_general_path(tmp_path: Path, path: str) -> None:
    """Every kind of value, valid or not, put alone where the lone way may take it: the
    same versions, states, snapshot, layers and events as the general path's, put after
    put (a ``true`` for a number, NaN, a lone surrogate, a value that changes nothing)."""
    (short, short_out), (general, general_out) = side_by_side(tmp_path)
    for revision, raw in enumerate([*LONE_RAWS, *LONE_RAWS], start=2):
        short.on_etcd_change(revision, {P + path: raw}, frozenset())
        general.on_etcd_change(revision, {P + path: raw}, frozenset())
        assert seen(short, short_out) == seen(general, general_out), raw
    assert saved(short) == saved(general)


class PlainLeaves(BaseModel):
    """Plain leaves with pydantic's own defaults: a float that takes NaN and infinity."""

    rate: float = 1.0
    name: str = "a"


@pytest.mark.parametrize("path", ["rate", "name"])
def test_each_lone_put_at_a_loose_leaf_ends_as_on_the_general_path(
    tmp_path: Path, path: str
) -> None:
    (short, short_out), (general, general_out) = side_by_side(tmp_path, PlainLeaves)
    for revision, raw in enumerate([*LONE_RAWS, b'"inf"', b'"-Infinity"', b"2"], start=2):
        short.on_etcd_change(revision, {P + path: raw}, frozenset())
        general.on_etcd_change(revision, {P + path: raw}, frozenset())
        assert seen(short, short_out) == seen(general, general_out), raw
    assert saved(short) == saved(general)


def test_versions_reserved_on_the_short_path_save_the_new_etcd_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make(tmp_path, {}, [])
    engine.start({}, 1)
    short_path_only(monkeypatch)
    assert engine.store is not None
    for step in range(2, VERSION_BLOCK + 3):
        engine.on_etcd_change(step, {P + "steps": str(step).encode()}, [])
        if engine.version == engine.store.ceiling - VERSION_BLOCK:  # just reserved, synchronously
            state = engine.store.load()
            assert state is not None and state.etcd["steps"] == step
    assert engine.store.ceiling > VERSION_BLOCK


@pytest.mark.parametrize(
    ("environ", "before", "puts", "deletes", "why"),
    [
        ({"HOTKNOB_PARAM_BAND__HI": "3"}, {}, {"band/hi": b"2"}, [], "a layer above etcd sets it"),
        ({}, {}, {"workers": b"4"}, [], "restart-only"),
        ({}, {"workers": b"4"}, {"steps": b"3"}, [], "a restart-only value held back"),
        ({}, {}, {"band/lo": b"5"}, [], "invalid with another key"),
        ({}, {}, {"tags/x": b"1"}, [], "inside a dict-typed field"),
        ({}, {}, {"nope": b"1"}, [], "not a key"),
        ({}, {}, {"steps": b"NaN"}, [], "not a number"),
        ({}, {"steps": b"3"}, {}, ["steps"], "a delete"),
        ({}, {"steps": b"3"}, {"steps": b"3"}, [], "nothing changes"),
    ],
)
def test_other_changes_take_the_general_path(
    tmp_path: Path,
    environ: dict[str, str],
    before: dict[str, bytes],
    puts: dict[str, bytes],
    deletes: list[str],
    why: str,
) -> None:
    engine = make(tmp_path, environ, [])
    engine.start({}, 1)
    engine.on_etcd_changes([(2, {P + k: v for k, v in before.items()}, frozenset())])
    merges: list[int] = []
    real = engine_module.merge_layers

    def counted(*args: Any, **kwargs: Any) -> Any:
        merges.append(1)
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine_module, "merge_layers", counted)
        engine.on_etcd_change(3, {P + k: v for k, v in puts.items()}, [P + k for k in deletes])
    assert merges, why


def test_a_rejected_change_leaves_the_etcd_layer_as_it_was(tmp_path: Path) -> None:
    engine = make(tmp_path, {}, [])
    engine.start({P + "tags": b'{"a": 1}'}, 1)
    before = engine.layers["etcd"]
    engine.on_etcd_change(2, {P + "tags/x": b"0.5", P + "workers": b"0.5"}, [])
    assert engine.version == 1 and engine.layers["etcd"] is before
    assert dict(before.values) == {"tags": {"a": 1}}


def test_a_group_builds_its_layer_and_snapshot_once_and_ends_on_its_newest_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Within a group the short path leaves the etcd layer and the snapshot to be built
    once; a change the general path takes in between starts from them built."""
    published: list[Published] = []
    engine = make(tmp_path, {}, published)
    engine.start({}, 1)
    built: list[int] = []
    real = engine_module.Snapshot

    def counted(*args: Any, **kwargs: Any) -> Any:
        built.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "Snapshot", counted)
    engine.on_etcd_changes(
        [
            (2, {P + "steps": b"3"}, frozenset()),
            (3, {P + "band/lo": b"0.5"}, frozenset()),
            (4, {P + "steps": b"4"}, frozenset()),
        ]
    )
    assert len(built) == 1 and len(published) == 2  # the start's state, then the group's
    assert engine.version == 4 and published[-1].version == 4 and published[-1].revision == 4
    assert dict(engine.layers["etcd"].values) == {"steps": 4, "band.lo": 0.5}
    assert engine.snapshot is not None and engine.snapshot.flat["steps"] == 4
    assert engine.snapshot.sources["band.lo"] == "etcd"

    engine.on_etcd_changes(
        [
            (5, {P + "steps": b"5"}, frozenset()),  # short
            (6, {P + "band/lo": b"7"}, frozenset()),  # lo > hi: the general path rejects it
        ]
    )
    assert engine.version == 5 and published[-1].version == 5 and published[-1].revision == 5
    assert published[-1].flat["steps"] == 5 and published[-1].flat["band.lo"] == 0.5
    assert dict(engine.layers["etcd"].values) == {"steps": 5, "band.lo": 0.5}

    engine.on_etcd_changes(
        [
            (7, {P + "steps": b"6"}, frozenset()),  # short
            (8, {}, frozenset({P + "band/lo"})),  # a delete: the general path accepts it
            (9, {P + "steps": b"7"}, frozenset()),  # short again, from the general path's state
        ]
    )
    assert engine.version == 8 and published[-1].version == 8
    assert published[-1].flat["steps"] == 7 and published[-1].flat["band.lo"] == 0.0
    assert published[-1].sources["band.lo"] == "defaults"
    assert dict(engine.layers["etcd"].values) == {"steps": 7}
    assert engine.snapshot is not None and dict(engine.snapshot.flat) == dict(published[-1].flat)


class Loose(BaseModel):
    extra: dict[str, Any] = Field(default_factory=dict)
    times: list[datetime] = Field(default_factory=list)
    steps: int = 1


class LooseParams(BaseModel):
    sec: Loose = Field(default_factory=Loose)


@pytest.mark.parametrize(
    "path, raw",
    [
        # Valid, but nested deeper than pydantic serializes: the dump raised out of the
        # engine, on either path.
        pytest.param("sec/extra", b'{"x":' + b"[" * 256 + b"]" * 256 + b"}", id="too-deep"),
        # 50 KB of text that makes 575 KB of JSON: the short path's bound on the state's
        # growth took 6 bytes of JSON per byte of text, and published it over the limit.
        pytest.param("sec/times", b"[" + b",".join([b"0"] * 25000) + b"]", id="grows-past-limit"),
    ],
)
def test_a_value_no_client_could_be_sent_is_refused_on_either_path(
    tmp_path: Path, path: str, raw: bytes
) -> None:
    (short, short_out), (general, general_out) = side_by_side(tmp_path, LooseParams)
    for engine in (short, general):
        engine.on_etcd_change(2, {P + path: raw, P + "sec/steps": b"3"}, frozenset())
        engine.on_etcd_change(3, {P + "sec/steps": b"4"}, frozenset())  # and it goes on
    assert seen(short, short_out) == seen(general, general_out)
    assert [p.flat["sec.steps"] for p in short_out] == [1, 4]
    [rejected] = [e for e in short.events if e["event"] == "change_rejected"]  # type: ignore[attr-defined]
    assert rejected["problems"][0]["key"] == path.replace("/", ".")
    short.close()
    general.close()
