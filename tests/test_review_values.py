"""One value, typed the ways users type it: a YAML number that YAML 1.1 reads otherwise
than every other layer (``010`` as octal 8, ``1:30`` in base 60), and whitespace around a
bare word (``echo slow | etcdctl put ...``), through the layers and a real daemon."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from hotknob.config import Layer, LayerError, cli_layer, env_layer, etcd_layer, read_config_file
from hotknob.config.keys import parse_text
from tests.daemon_proc import DaemonProcess, RawClient, run_cli
from tests.etcd_server import EtcdServer

pytestmark = pytest.mark.timeout(60)


class Knobs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "base"
    mode: Literal["fast", "slow"] = "fast"
    count: int = 3
    ids: list[int] = Field(default_factory=lambda: [1])


class Params(BaseModel):
    """A small schema with text fields (the built-in one has numbers only)."""

    model_config = ConfigDict(extra="forbid")

    k: Knobs = Field(default_factory=Knobs)


SCHEMA = "tests.test_review_values:Params"

# A tab in a comment sends a text to PyYAML's Python reader alone (``_FAST_YAML_UNLIKE``):
# both readers must read a number the same way.
READERS = pytest.mark.parametrize("tail", ["", "  #\tcomment"], ids=["libyaml", "python"])


def _yaml(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "conf.yaml"
    path.write_text(body)
    return path


@READERS
@pytest.mark.parametrize("typed", ["010", "-010", "0_10", "[1, 010]", "!!int 010"])
def test_yaml_reads_no_integer_with_a_leading_zero_as_octal(
    tmp_path: Path, tail: str, typed: str
) -> None:
    path = _yaml(tmp_path, f"k:\n  name: x\n  count: {typed}{tail}\n")
    with pytest.raises(LayerError) as caught:
        read_config_file(path)
    said = str(caught.value)
    assert said.startswith(f"{path}: k.count: an integer with a leading 0"), said
    assert "octal" in said and "at line 3, column" in said, said
    assert "write it without the leading 0" in said, said
    assert caught.value.key == "k.count"


@READERS
@pytest.mark.parametrize("typed", ["1:30", "1:30.5", "[2:05]"])
def test_yaml_reads_no_number_with_a_colon_in_base_60(
    tmp_path: Path, tail: str, typed: str
) -> None:
    path = _yaml(tmp_path, f"k:\n  count: {typed}{tail}\n")
    with pytest.raises(LayerError) as caught:
        read_config_file(path)
    said = str(caught.value)
    assert said.startswith(f"{path}: k.count: a number with a ':'"), said
    assert "base 60" in said and "line 2, column" in said and "quote it" in said, said


@READERS
def test_yaml_numbers_that_read_the_same_every_way_are_taken(tmp_path: Path, tail: str) -> None:
    body = (
        "k:\n  a: 07\n  b: 00\n  c: '010'\n  d: 0x10\n  e: 1_000\n  f: 010.5\n"
        f'  g: "1:30"\n  h: 9007199254740993{tail}\n'
    )
    read = read_config_file(_yaml(tmp_path, body))["k"]
    assert read == {
        "a": 7,
        "b": 0,
        "c": "010",
        "d": 16,
        "e": 1000,
        "f": 10.5,
        "g": "1:30",
        "h": 9007199254740993,
    }


def test_validate_refuses_the_yaml_octal_that_set_reads_as_decimal(tmp_path: Path) -> None:
    """The same text, two layers: ``--set`` reads ``010`` as 10; a file, refused, does not
    silently run 8 instead."""
    path = _yaml(tmp_path, "train:\n  warmup_steps: 010\n")
    done = run_cli("validate", str(path), drop="HOTKNOB_")
    assert done.returncode == 1, done
    assert "octal" in done.stderr + done.stdout, done
    got = run_cli("get", "--set", "train.warmup_steps=010", "--json", drop="HOTKNOB_")
    assert got.returncode == 0, got
    assert json.loads(got.stdout)["train.warmup_steps"] == 10


@pytest.mark.parametrize("typed", [" slow", "slow\n", "\tslow  "])
def test_whitespace_around_a_bare_word_is_no_part_of_it(typed: str) -> None:
    assert parse_text(typed) == "slow"
    assert cli_layer([f"k.mode={typed}"]).values["k.mode"] == "slow"
    environ = {"HOTKNOB_PARAM_K__MODE": typed}
    assert env_layer(Params, environ=environ).values["k.mode"] == "slow"
    etcd = etcd_layer("a", {"/hotknob/a/config/k/mode": typed.encode()})
    assert etcd.values["k.mode"] == "slow"


def test_whitespace_inside_quotes_is_kept() -> None:
    assert parse_text(' " slow " ') == " slow "
    assert cli_layer(["k.name = x"]).values["k.name"] == "x"
    assert cli_layer(['k.name=" x "']).values["k.name"] == " x "


def test_a_word_put_from_echo_reaches_processes_without_its_newline(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """``echo slow | etcdctl put KEY`` stores ``slow`` and a newline: a number so put is
    taken, and so is a word, as the word."""
    with (
        DaemonProcess(tmp_path, app="v", endpoints=etcd.endpoint, extra=["--schema", SCHEMA]),
        RawClient(tmp_path / "sock" / "v.sock") as client,
    ):
        assert client.snapshot["values"]["k"]["mode"] == "fast"
        etcd.etcdctl("put", "/hotknob/v/config/k/mode", input="slow\n")
        assert client.next_update()["changed"] == {"k.mode": "slow"}
        etcd.etcdctl("put", "/hotknob/v/config/k/name", input="hello\n")
        assert client.next_update()["changed"] == {"k.name": "hello"}
        etcd.etcdctl("put", "/hotknob/v/config/k/count", input="5\n")
        update = client.next_update()
    assert update["changed"] == {"k.count": 5}
    assert update["values"]["k"] == {"name": "hello", "mode": "slow", "count": 5, "ids": [1]}


@pytest.mark.parametrize("layer", ["cli", "etcd", "env"])
def test_a_text_field_given_a_number_says_to_quote_it(layer: str) -> None:
    """``--set k.name=1e3`` is the number 1000.0 (a value there is JSON text), which a text
    field refuses: the refusal says to give it in quotes, not only that it is no text."""
    from hotknob.config import InvalidChange, defaults_layer, merge_layers

    if layer == "cli":
        given = cli_layer(["k.name=1e3"])
    elif layer == "etcd":
        given = etcd_layer("a", {"/hotknob/a/config/k/name": b"1e3"})
    else:
        given = env_layer(Params, environ={"HOTKNOB_PARAM_K__NAME": "1e3"})
    with pytest.raises(InvalidChange) as caught:
        merge_layers(Params, [defaults_layer(Params), given])
    [problem] = caught.value.problems
    assert (problem.key, problem.layer) == ("k.name", layer)
    assert "valid string" in problem.reason and "give it in quotes" in problem.reason
    # From a file the text is YAML's or TOML's to read: no such hint.
    with pytest.raises(InvalidChange) as caught:
        merge_layers(Params, [defaults_layer(Params), Layer("files", {"k.name": 7})])
    assert "quotes" not in caught.value.problems[0].reason
