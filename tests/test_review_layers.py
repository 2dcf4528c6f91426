"""The configuration layers as a user meets them: env variables, ``--set``, files, and
the commands that show the result (``get``, ``explain``)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

from hotknob.config import (
    InvalidChange,
    cli_layer,
    defaults_layer,
    env_layer,
    etcd_layer,
    files_layer,
    merge_layers,
)
from tests.daemon_proc import run_cli

pytestmark = pytest.mark.timeout(60)


class _Run(BaseModel):
    name: str = "x"


class _Opt(BaseModel):
    beta: float = 0.5


class _Top(BaseModel):
    """A schema with leaves of the model itself (``seed``), a section, a mapping and an
    optional model."""

    seed: int = 0
    run: _Run = Field(default_factory=_Run)
    weights: dict[str, float] = {"head": 1.0}
    opt: _Opt | None = None


def _env_merge(environ: dict[str, str]) -> InvalidChange | None:
    """What merging the defaults and the env layer of ``environ`` refused; None if nothing."""
    try:
        merge_layers(_Top, [defaults_layer(_Top), env_layer(_Top, environ=environ)])
    except InvalidChange as exc:
        return exc
    return None


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The CLI run to completion, without the caller's ``HOTKNOB_*`` variables."""
    result: subprocess.CompletedProcess[str] = run_cli(*args, env=env, drop="HOTKNOB_")
    return result


@pytest.mark.parametrize("name", ["HOTKNOB_PARAM_SEED__X", "HOTKNOB_PARAM_seed__typo"])
def test_env_variable_below_a_leaf_of_the_model_is_refused_not_dropped(name: str) -> None:
    # ``seed`` is a number: ``seed.x`` is no key, as ``--set seed.x=1`` says. The variable
    # must not vanish (a typo in a container spec would go unnoticed).
    refused = _env_merge({name: "1"})
    assert refused is not None, f"{name}=1 was silently ignored"
    key = "seed." + name.rsplit("__", 1)[1].lower()
    assert [(p.key, p.layer, p.reason) for p in refused.problems] == [
        (key, "env", "not a key of the schema")
    ]


def test_env_variable_below_a_leaf_of_a_section_names_its_own_key() -> None:
    # Not "train.lr: Input should be a valid number": the variable gives no train.lr.
    done = _cli("get", "train.lr", env={"HOTKNOB_PARAM_TRAIN__LR__X": "1"})
    assert done.returncode == 1, done
    assert done.stderr.strip() == "hotknob: train.lr.x (from env): not a key of the schema"


def test_env_variable_inside_a_mapping_still_sets_its_key(tmp_path: Path) -> None:
    assert _env_merge({"HOTKNOB_PARAM_WEIGHTS__TAIL": "2"}) is None
    snapshot = merge_layers(
        _Top,
        [defaults_layer(_Top), env_layer(_Top, environ={"HOTKNOB_PARAM_WEIGHTS__TAIL": "2"})],
    )
    assert snapshot.flat["weights"] == {"head": 1.0, "tail": 2.0}
    assert snapshot.sources["weights"] == "env"


@pytest.mark.parametrize("name", ["HOTKNOB_PARAM_OPT", "HOTKNOB_PARAM_opt"])
def test_env_null_for_an_optional_model_overrides_the_file(name: str) -> None:
    # ``--set opt=null`` turns the file's ``opt`` off; the variable must do the same, not
    # vanish and leave the file's value in force.
    files = files_layer(_Top, [(Path("c.yaml"), {"opt": {"beta": 0.3}})])
    env = env_layer(_Top, environ={name: "null"})
    snapshot = merge_layers(_Top, [defaults_layer(_Top), files, env])
    assert snapshot.flat["opt"] is None
    assert snapshot.sources["opt"] == "env"


def test_env_null_for_a_mapping_that_takes_none_is_refused() -> None:
    refused = _env_merge({"HOTKNOB_PARAM_WEIGHTS": "null"})
    assert refused is not None, "HOTKNOB_PARAM_WEIGHTS=null was silently ignored"
    assert [(p.key, p.layer) for p in refused.problems] == [("weights", "env")]


def test_env_null_for_a_section_is_refused_as_a_file_null_section_is(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("train:\n")
    by_file = _cli("get", "train.lr", "--config", str(config), env={})
    by_env = _cli("get", "train.lr", env={"HOTKNOB_PARAM_TRAIN": "null"})
    assert by_file.returncode == 1, by_file
    assert by_env.returncode == 1, by_env
    assert by_env.stderr.startswith("hotknob: train (from env): a section given nothing"), by_env


@pytest.mark.parametrize(
    ("environ", "key", "names"),
    [
        (
            {"HOTKNOB_PARAM_RUN": '{"name": "a"}', "HOTKNOB_PARAM_RUN__NAME": '"b"'},
            "run.name",
            ("HOTKNOB_PARAM_RUN", "HOTKNOB_PARAM_RUN__NAME"),
        ),
        (
            {"HOTKNOB_PARAM_WEIGHTS": '{"a": 1}', "HOTKNOB_PARAM_WEIGHTS__A": "2"},
            "weights.a",
            ("HOTKNOB_PARAM_WEIGHTS", "HOTKNOB_PARAM_WEIGHTS__A"),
        ),
        (
            {"HOTKNOB_PARAM_OPT": "null", "HOTKNOB_PARAM_OPT__BETA": "0.2"},
            "opt.beta",
            ("HOTKNOB_PARAM_OPT", "HOTKNOB_PARAM_OPT__BETA"),
        ),
    ],
)
def test_a_key_two_env_variables_give_is_refused(
    environ: dict[str, str], key: str, names: tuple[str, str]
) -> None:
    # One of the two values would be dropped without a word, as a file's duplicate key
    # would be (which is refused).
    refused = _env_merge(environ)
    assert refused is not None, f"{environ} kept one value and dropped the other"
    assert [(p.key, p.layer) for p in refused.problems] == [(key, "env")]
    assert all(name in refused.problems[0].reason for name in names)


def test_a_section_variable_and_a_key_variable_of_other_keys_both_count() -> None:
    environ = {"HOTKNOB_PARAM_RUN": '{"name": "a"}', "HOTKNOB_PARAM_WEIGHTS__TAIL": "2"}
    snapshot = merge_layers(_Top, [defaults_layer(_Top), env_layer(_Top, environ=environ)])
    assert snapshot.flat["run.name"] == "a"
    assert snapshot.flat["weights"] == {"head": 1.0, "tail": 2.0}


def test_the_cli_names_both_variables_of_a_key_given_twice() -> None:
    done = _cli(
        "get",
        "train.lr",
        env={"HOTKNOB_PARAM_TRAIN": '{"lr": 0.5}', "HOTKNOB_PARAM_TRAIN__LR": "0.3"},
    )
    assert done.returncode == 1, done
    assert done.stderr.strip() == (
        "hotknob: train.lr (from env): HOTKNOB_PARAM_TRAIN and HOTKNOB_PARAM_TRAIN__LR "
        "both set it: keep one"
    )


_TWICE = '{"a": 1, "a": 2}'


def test_a_json_value_that_gives_a_key_twice_is_refused_in_every_text_layer() -> None:
    # A file that gives a key twice is refused; JSON text in env, --set and etcd would keep
    # the last value and drop the first without a word.
    layers = {
        "cli": cli_layer([f"weights={_TWICE}"]),
        "env": env_layer(_Top, environ={"HOTKNOB_PARAM_WEIGHTS": _TWICE}),
        "etcd": etcd_layer("job", {"/hotknob/job/config/weights": _TWICE.encode()}),
    }
    for name, layer in layers.items():
        with pytest.raises(InvalidChange) as refused:
            merge_layers(_Top, [defaults_layer(_Top), layer])
        assert [(p.key, p.layer) for p in refused.value.problems] == [("weights", name)]
        assert "'a' twice" in refused.value.problems[0].reason, name


def test_a_section_variable_that_gives_a_key_twice_is_refused() -> None:
    done = _cli("get", "train.lr", env={"HOTKNOB_PARAM_TRAIN": '{"lr": 0.5, "lr": 0.1}'})
    assert done.returncode == 1, done
    assert done.stderr.strip() == (
        "hotknob: train (from env): HOTKNOB_PARAM_TRAIN: its JSON gives the key 'lr' twice: "
        "keep one"
    )


def test_a_refused_file_value_names_the_file_among_several(tmp_path: Path) -> None:
    # "train.lr (from files)" did not say which of the --config files to fix.
    good, bad = tmp_path / "base.yaml", tmp_path / "override.yaml"
    good.write_text("train:\n  lr: 0.1\n  momentum: 0.5\n")
    bad.write_text("train:\n  lr: -1\n  weight_decay: 0.01\n")
    refused = _cli("get", "train.lr", "--config", str(good), "--config", str(bad), env={})
    assert refused.returncode == 1
    assert f"train.lr (from files: {bad}): Input should be greater than 0" in refused.stderr
    assert str(good) not in refused.stderr


def test_a_problem_of_a_mapping_names_the_file_that_gave_it(tmp_path: Path) -> None:
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    files = files_layer(_Top, [(first, {"seed": 3}), (second, {"weights": {"head": "x"}})])
    with pytest.raises(InvalidChange) as info:
        merge_layers(_Top, [defaults_layer(_Top), files])
    assert [(p.key, p.layer, p.origin) for p in info.value.problems] == [
        ("weights", "files", str(second))
    ]
    assert str(info.value).startswith(f"weights (from files: {second}): ")


def test_a_problem_of_another_layer_names_no_file(tmp_path: Path) -> None:
    files = files_layer(_Top, [(tmp_path / "c.yaml", {"seed": 3})])
    with pytest.raises(InvalidChange) as info:
        merge_layers(_Top, [defaults_layer(_Top), files, cli_layer(["seed=-x"])])
    assert [(p.key, p.layer, p.origin) for p in info.value.problems] == [("seed", "cli", "")]
