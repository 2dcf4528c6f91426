"""The bad inputs the bad-input tests feed, and the checks on what comes out of one.

Hypothesis strategies for etcd values and keys (the classics: NaN, ±inf, huge
numbers, a 1 MiB string, nested junk, keys outside the schema), sequences of etcd
changes, config files (classic traps, truncated and random ones) and protocol
lines; ``assert_clear`` and ``assert_deliverable`` say what a clear error and a
state a client may receive look like. Apart from ``tests/test_bad_input.py`` so that
the tests there read as what is fed where and what must hold.
"""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from hotknob.config import InvalidChange, MLParams
from hotknob.config.keys import config_prefix, flatten
from hotknob.config.schema import iter_leaves
from hotknob.model_runtime import protocol

APP = "bad"
PREFIX = config_prefix(APP)
LEAVES = [leaf.key for leaf in iter_leaves(MLParams)]
FAST = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --- strategies ----------------------------------------------------------------------------------

json_junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
classic_values = st.sampled_from(
    [
        "NaN", "nan", "Infinity", "-Infinity", "inf", "1e309", "-1e309", "1e-400",
        "9" * 400, "-" + "9" * 400, "9" * 5000, "", " ", "null", "true", "[]", "{}",
        '"0.1"', "0x10", "1_000", "0.1.2", "\x00", '{"lr": 0.1}', "[0.1]", "x" * (1 << 20),
    ]
)  # fmt: skip
etcd_text = (
    classic_values
    | st.text(max_size=40)
    | json_junk.map(json.dumps)
    | st.floats().map(repr)
    | st.integers(min_value=-(10**30), max_value=10**30).map(str)
)
etcd_raw = etcd_text.map(lambda t: t.encode("utf-8", "surrogatepass")) | st.binary(max_size=40)
schema_or_junk_key = st.sampled_from(LEAVES) | st.sampled_from(
    ["train.bogus", "bogus.x", "train.lr.deeper", "train", "sampling", "a.b.c.d", "x"]
)


def path_of(key: str) -> str:
    return PREFIX + key.replace(".", "/")


def assert_clear(exc: InvalidChange) -> None:
    assert exc.problems, "an InvalidChange names its problems"
    for problem in exc.problems:
        assert problem.reason and problem.layer in ("etcd", "files", "defaults", ""), problem
        assert str(problem)


def assert_deliverable(values: Any) -> None:
    """What a client would receive: validates against the schema and encodes as protocol JSON."""
    MLParams.model_validate(values)
    protocol.encode(protocol.snapshot(1, 1, values, {}))
    for value in flatten(values).values():
        assert not (isinstance(value, float) and not math.isfinite(value)), values


# Valid for every float leaf, so that some changes are accepted and then published.
plausible_raw = st.floats(0.01, 0.9).map(lambda f: repr(f).encode())
change = st.tuples(
    st.dictionaries(
        st.sampled_from(LEAVES) | schema_or_junk_key,
        plausible_raw | plausible_raw | etcd_raw,
        max_size=3,
    ),
    st.lists(schema_or_junk_key, max_size=2),
)


def _nest(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


classic_files = st.sampled_from(
    [
        ("yaml", b"a: &a [1,2]\nb: &b [*a,*a,*a,*a]\nc: [*b,*b,*b,*b]\n"),  # an alias bomb
        ("yaml", b"train:\n  lr: 0.1\n  lr: 0.2\n"),  # duplicate keys
        ("json", b'{"train": {"lr": 0.1, "lr": 0.2}}'),
        ("toml", b"[train]\nlr = 0.1\nlr = 0.2\n"),
        ("json", _nest(100_000).encode()),
        ("yaml", ("[" * 100_000).encode()),
        ("yaml", "train:\n  lr: 0.1\n".encode("utf-16")),
        ("json", '{"train": {"lr": "\xe9"}}'.encode("latin-1")),
        ("yaml", b"\x00\x01\x02\xff\xfe"),
        ("json", b'{"train": {"lr": NaN}}'),
        ("json", b'{"train": {"lr": Infinity}}'),
        ("yaml", b"train:\n  lr: .nan\n"),
        ("yaml", b"train:\n  lr: .inf\n"),
        ("yaml", b"- 1\n- 2\n"),
        ("toml", b"train = 1\n"),
        ("yaml", b"!!python/object/apply:os.system ['true']\n"),
        ("yaml", b""),
        ("json", b"   \n"),
    ]
)
valid_doc = st.fixed_dictionaries(
    {
        "train": st.fixed_dictionaries(
            {"lr": st.floats(1e-5, 1.0), "warmup_steps": st.integers(0, 9)}
        )
    }
)


def _render(kind: str, doc: dict[str, Any]) -> bytes:
    if kind == "json":
        return json.dumps(doc).encode()
    if kind == "toml":
        train = doc["train"]
        return f"[train]\nlr = {train['lr']!r}\nwarmup_steps = {train['warmup_steps']}\n".encode()
    train = doc["train"]
    return f"train:\n  lr: {train['lr']!r}\n  warmup_steps: {train['warmup_steps']}\n".encode()


truncated_files = st.tuples(
    st.sampled_from(["yaml", "json", "toml"]), valid_doc, st.floats(0, 1)
).map(lambda t: (t[0], (data := _render(t[0], t[1]))[: int(len(data) * t[2])]))
random_files = st.tuples(st.sampled_from(["yaml", "json", "toml"]), st.binary(max_size=200))
text_files = st.tuples(
    st.sampled_from(["yaml", "json", "toml"]), st.text(max_size=200).map(str.encode)
)


client_message = st.fixed_dictionaries(
    {"type": st.sampled_from(["hello", "applied", "metrics", "snapshot", "bogus", ""])},
    optional={
        "protocol": st.integers(-1, 3) | st.text(max_size=3) | st.none(),
        "client": st.text(max_size=300) | st.integers(),
        "pid": st.integers(-5, 10) | st.text(max_size=3),
        "version": st.integers(-5, 10) | st.floats() | st.booleans(),
        "step": st.integers(-5, 10) | st.none(),
        "latest": st.dictionaries(st.text(max_size=5), st.floats(), max_size=2) | st.integers(),
    },
)
protocol_lines = (
    st.binary(max_size=200)
    | st.text(max_size=200).map(str.encode)
    | json_junk.map(lambda v: json.dumps(v).encode())
    | client_message.map(lambda m: json.dumps(m).encode())
)
