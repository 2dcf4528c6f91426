"""Bad input everywhere: every one gets a clear error, nothing invalid reaches a client.

Three levels, each counting the inputs it tried (``INPUTS``; the last test checks
the total reaches 1,000 and records it):

- pure functions, with hypothesis, for volume: etcd values through the etcd layer
  and the merge, sequences of etcd changes through the ``Engine`` (every state it
  publishes must validate), config file bytes through the file reader, and protocol
  lines through the decoder;
- a real ``hotknob run`` on a real etcd, fed a few hundred bad etcd values and keys
  (hypothesis-generated plus the classics: NaN, ±inf, huge numbers, a 1 MiB string,
  nested junk, keys outside the schema and outside the prefix), with a live client
  that validates every state it receives against ``MLParams``;
- the same daemon's socket, fed garbage, over-long and partial lines, a client that
  never reads, 200 connections at once, a wrong protocol version and messages out
  of order: each gets an ``error`` line and only that connection closes.
"""

from __future__ import annotations

import json
import socket
from collections import Counter
from collections.abc import Iterator

import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from hotknob.config import (
    InvalidChange,
    LayerError,
    MLParams,
    defaults_layer,
    etcd_layer,
    files_layer,
    merge_layers,
    read_config_file,
)
from hotknob.daemon.engine import Engine
from hotknob.daemon.socket_server import Published
from hotknob.model_runtime import protocol
from hotknob.model_runtime.received import thaw
from tests.bad_input_daemon import LiveSetup, assert_error_then_closed, exchange
from tests.bad_inputs import (
    APP,
    FAST,
    LEAVES,
    assert_clear,
    assert_deliverable,
    change,
    classic_files,
    etcd_raw,
    path_of,
    protocol_lines,
    random_files,
    schema_or_junk_key,
    text_files,
    truncated_files,
)
from tests.daemon_proc import RawClient
from tests.figures import record
from tests.live_trainer import wait_for

pytestmark = pytest.mark.timeout(120)

INPUTS: Counter[str] = Counter()
REJECTED: Counter[str] = Counter()
ACCEPTED: Counter[str] = Counter()

# --- pure: etcd values, engine, files, protocol lines ---------------------------------------------


@settings(FAST, max_examples=400)
@given(st.dictionaries(schema_or_junk_key, etcd_raw, min_size=1, max_size=4))
def test_etcd_values_yield_a_valid_state_or_a_clear_error(kvs: dict[str, bytes]) -> None:
    INPUTS["etcd values (merge)"] += len(kvs)
    layer = etcd_layer(APP, {path_of(k): v for k, v in kvs.items()})
    try:
        snapshot = merge_layers(MLParams, [defaults_layer(MLParams), layer])
    except InvalidChange as exc:
        assert_clear(exc)
        REJECTED["etcd values (merge)"] += len(kvs)
        return
    assert_deliverable(thaw(snapshot.values))


@settings(FAST, max_examples=150)
@given(st.lists(change, min_size=1, max_size=8))
def test_engine_publishes_only_valid_states_with_rising_versions(
    changes: list[tuple[dict[str, bytes], list[str]]],
) -> None:
    published: list[Published] = []
    engine = Engine(
        schema=MLParams,
        app=APP,
        precedence=("defaults", "files", "etcd", "env", "cli"),
        layers=[defaults_layer(MLParams), files_layer(MLParams, [])],
        publish=published.append,
    )
    engine.start({}, 1)
    for revision, (puts, deletes) in enumerate(changes, start=2):
        INPUTS["etcd changes (engine)"] += 1
        before = engine.current
        engine.on_etcd_change(
            revision, {path_of(k): v for k, v in puts.items()}, [path_of(k) for k in deletes]
        )
        if engine.current is not before:
            ACCEPTED["etcd changes (engine)"] += 1
    versions = [p.version for p in published]
    assert versions == sorted(set(versions))
    for state in published:
        assert_deliverable(thaw(state.values))


@settings(FAST, max_examples=300)
@given(classic_files | truncated_files | random_files | text_files)
def test_config_files_parse_to_a_valid_state_or_a_clear_error(
    tmp_path_factory: pytest.TempPathFactory, case: tuple[str, bytes]
) -> None:
    kind, data = case
    INPUTS["config files"] += 1
    path = tmp_path_factory.getbasetemp() / f"params.{kind}"
    path.write_bytes(data)
    try:
        parsed = read_config_file(path)
    except LayerError as exc:
        assert exc.layer == "files" and str(path) in str(exc) and "\n" not in str(exc), exc
        REJECTED["config files"] += 1
        return
    try:
        snapshot = merge_layers(
            MLParams, [defaults_layer(MLParams), files_layer(MLParams, [(path, parsed)])]
        )
    except InvalidChange as exc:
        assert_clear(exc)
        REJECTED["config files"] += 1
        return
    assert_deliverable(thaw(snapshot.values))


@settings(FAST, max_examples=250)
@given(protocol_lines, st.booleans())
def test_protocol_lines_are_a_message_or_a_clear_error(line: bytes, said_hello: bool) -> None:
    INPUTS["protocol lines (decoder)"] += 1
    try:
        message = protocol.decode(line)
        protocol.validate_client_message(message, said_hello=said_hello)
    except protocol.ProtocolError as exc:
        assert str(exc) and "\n" not in str(exc)
        REJECTED["protocol lines (decoder)"] += 1
        return
    assert message["type"] in protocol.CLIENT_TYPES


# --- a real daemon on a real etcd ----------------------------------------------------------------


@pytest.fixture(scope="module")
def live_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveSetup]:
    setup = LiveSetup(tmp_path_factory.mktemp("bad-daemon"))
    try:
        yield setup.start()
    finally:
        setup.close()


def _verdicts(setup: LiveSetup) -> tuple[set[int], set[int]]:
    accepted = {int(e["revision"]) for e in setup.daemon.events("change_accepted")}
    rejected = {int(e["revision"]) for e in setup.daemon.events("change_rejected")}
    return accepted, rejected


MUST_REJECT = [
    ("train.lr", "NaN"), ("train.lr", "Infinity"), ("train.lr", "-Infinity"), ("train.lr", "1e309"),
    ("train.lr", "-1"), ("train.lr", "x" * (1 << 20)), ("train.lr", '{"a": [1, {"b": null}]}'),
    ("train.warmup_steps", "9" * 5000), ("train.warmup_steps", "1.5"), ("train.momentum", "true"),
    ("sampling.top_p", "[]"), ("sampling.top_k", "-3"), ("train.bogus", "1"), ("bogus.x", "1"),
    ("train.lr.deeper", "1"), ("train", "{}"), ("train.lr", "[" * 50_000),
]  # fmt: skip


def test_bad_etcd_values_through_a_real_daemon(live_setup: LiveSetup) -> None:
    store = live_setup.store
    assert store is not None
    writes: list[tuple[int, str, bytes]] = []

    for key, raw in MUST_REJECT:
        writes.append((store.commit({path_of(key): raw}), key, raw.encode()))
    for outside in ("/hotknob/other/config/train/lr", "/hotknob/bad/configx/train/lr",
                    "/hotknob/bad/status/n/x", "/hotknob/bad", "/elsewhere/train/lr"):  # fmt: skip
        store.commit({outside: "-1"})
        INPUTS["etcd keys outside the prefix (daemon)"] += 1

    @settings(FAST, max_examples=220, phases=[Phase.generate])
    @given(schema_or_junk_key, etcd_raw)
    def feed(key: str, raw: bytes) -> None:
        writes.append((store.commit({path_of(key): raw}), key, raw))

    feed()
    sentinel = store.commit({path_of("sampling.max_new_tokens"): "777"})
    wait_for("the sentinel", lambda: sentinel in _verdicts(live_setup)[0], 30)
    INPUTS["etcd values (daemon)"] += len(writes)

    assert live_setup.alive()
    accepted, rejected = _verdicts(live_setup)
    silent = [(rev, key, raw[:60]) for rev, key, raw in writes if rev not in accepted | rejected]
    for rev, key, head in silent:  # no verdict only when the value equals the one in force
        assert key in LEAVES, (rev, key, head)
    must = [rev for rev, _, _ in writes[: len(MUST_REJECT)]]
    assert not [r for r in must if r not in rejected], "a must-reject value was not rejected"
    REJECTED["etcd values (daemon)"] += sum(1 for rev, _, _ in writes if rev in rejected)
    for event in live_setup.daemon.events("change_rejected"):
        assert event["reason"] and event["key"] is not None and len(json.dumps(event)) < 20_000

    for message in live_setup.received():
        if message["type"] in ("snapshot", "update"):
            assert_deliverable(message["values"])
    wait_for("the client to apply the sentinel", lambda: live_setup.live is not None
             and live_setup.live["sampling.max_new_tokens"] == 777)  # fmt: skip
    assert live_setup.trainer is not None
    assert not live_setup.trainer.invalid and not live_setup.trainer.errors


# --- the daemon's socket -------------------------------------------------------------------------


@settings(FAST, max_examples=120, phases=[Phase.generate])
@given(line=protocol_lines)
def test_socket_garbage_gets_an_error_and_closes_only_that_connection(
    live_setup: LiveSetup, line: bytes
) -> None:
    INPUTS["socket lines (daemon)"] += 1
    line = line.replace(b"\n", b" ")
    if not line.strip():
        line = b"\x00"
    try:
        message = protocol.decode(line)
        protocol.validate_client_message(message, said_hello=False)
    except protocol.ProtocolError:
        assert_error_then_closed(exchange(live_setup.daemon.socket_path, line + b"\n"))
        REJECTED["socket lines (daemon)"] += 1
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:  # a valid hello: a snapshot
        sock.settimeout(5)
        sock.connect(str(live_setup.daemon.socket_path))
        sock.sendall(line + b"\n")
        first = sock.makefile("rb").readline()
    assert protocol.decode(first)["type"] == "snapshot"


SOCKET_CASES = [
    (b'{"type":"hello","protocol":2,"client":"x"}\n', "unsupported protocol 2"),
    (b'{"type":"hello","protocol":"1","client":"x"}\n', "unsupported protocol"),
    (b'{"type":"applied","version":1,"step":1}\n', '"applied" before "hello"'),
    (b'{"type":"metrics","step":1,"latest":{}}\n', '"metrics" before "hello"'),
    (protocol.encode(protocol.hello("x")) * 2, '"hello" was already sent'),
    (protocol.encode(protocol.hello("x")) + b'{"type":"applied","version":-1,"step":0}\n',
     'integer "version"'),
    (protocol.encode(protocol.hello("x")) + b'{"type":"snapshot"}\n', "unknown message type"),
    (b'{"type":"hello","protocol":1,"client":"' + b"c" * 300 + b'"}\n', "at most 256"),
    (b'{"type":"hello","protocol":1,"pid":-4}\n', 'integer "pid"'),
    (b"[1,2,3]\n", "JSON object"),
    (b'{"type":"hello","protocol":NaN}\n', "not a valid JSON number"),
    (b"\xff\xfe\n", "not valid UTF-8"),
    (b"x" * (protocol.MAX_LINE_BYTES + 10) + b"\n", "byte limit"),
    (b'{"type": 7}\n', 'string "type"'),
    (b'{"type":"hello","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", "nested too deeply"),
    (b'{"type":"hello","protocol":1,"pid":1e999}\n', 'integer "pid"'),
    (protocol.encode(protocol.hello("x")) + b'{"type":"applied","version":1,"step":1,'
     b'"errors":["boom"]}\n', '"errors" must be'),
]  # fmt: skip


@pytest.mark.parametrize(("data", "fragment"), SOCKET_CASES, ids=[f for _, f in SOCKET_CASES])
def test_socket_protocol_violations(live_setup: LiveSetup, data: bytes, fragment: str) -> None:
    INPUTS["socket protocol cases (daemon)"] += 1
    assert_error_then_closed(exchange(live_setup.daemon.socket_path, data), fragment)
    REJECTED["socket protocol cases (daemon)"] += 1
    assert live_setup.alive()


def test_partial_lines_a_client_that_never_reads_and_200_connections(
    live_setup: LiveSetup,
) -> None:
    path = live_setup.daemon.socket_path
    store = live_setup.store
    assert store is not None
    # A partial line, then EOF: the last line without a newline still counts (here: a hello).
    replies = exchange(path, protocol.encode(protocol.hello("partial")).rstrip(b"\n"))
    assert [r["type"] for r in replies] == ["snapshot"]
    # A partial line that stays open: nothing is answered, nothing breaks.
    dangling = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dangling.connect(str(path))
    dangling.sendall(b'{"type":"hel')
    # A client that says hello and then never reads, with a tiny receive buffer.
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(str(path))
    stuck.sendall(protocol.encode(protocol.hello("never-reads")))
    crowd: list[RawClient] = []
    try:
        for i in range(200):
            crowd.append(RawClient(path, name=f"crowd-{i}"))
        INPUTS["socket connections at once (daemon)"] += len(crowd) + 2
        for i in range(300):  # 300 changes the stuck client never reads
            store.commit({path_of("train.warmup_steps"): str(1000 + i)})
        for client in crowd:
            wait_update = client.next_update
            values = wait_update(timeout=20)["values"]
            while values["train"]["warmup_steps"] != 1299:
                values = wait_update(timeout=20)["values"]
            assert_deliverable(values)
        assert live_setup.alive()
    finally:
        for client in crowd:
            client.close()
        dangling.close()
        stuck.close()


def test_zz_inputs_tried_reach_one_thousand() -> None:
    needed = {
        "etcd values (merge)",
        "config files",
        "etcd values (daemon)",
        "socket lines (daemon)",
    }
    if not needed <= set(INPUTS):
        pytest.skip("counts inputs only when the whole module runs")
    total = sum(INPUTS.values())
    assert total >= 1000, INPUTS
    assert ACCEPTED["etcd changes (engine)"] > 0, "the engine test must also see valid changes"
    record(
        "bad-input",
        command="pytest tests/test_bad_input.py",
        inputs_total=total,
        inputs=dict(INPUTS),
        rejected_with_a_clear_error=dict(REJECTED),
        engine_changes_published=ACCEPTED["etcd changes (engine)"],
        invalid_values_delivered=0,
        daemon_crashes=0,
    )
