"""The read-side commands (``validate``, ``get``, ``explain``) run as a git hook or an
operator runs them: real subprocesses of the CLI, real files, custom schemas."""

from __future__ import annotations

import textwrap
from pathlib import Path

from .daemon_proc import run_cli

_NESTED_SCHEMA = """
from typing import Optional

from pydantic import BaseModel, SecretStr


class Inner(BaseModel):
    a: int = 1
    b: str = "x"


class Creds(BaseModel):
    user: str = "u"
    password: SecretStr = SecretStr("pw")


class Params(BaseModel):
    inner: Optional[Inner] = None
    by_name: dict[str, Inner] = {}
    creds: Optional[Creds] = None
"""


def _schema(tmp_path: Path, name: str, text: str) -> dict[str, str]:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(text))
    return {"PYTHONPATH": str(tmp_path)}


def test_validate_fails_when_the_schema_module_exits_at_import(tmp_path: Path) -> None:
    """A schema module that runs a script's code at import (``sys.exit(0)``) ended the
    command with that code: ``validate`` in a git hook passed, silently, checking
    nothing."""
    env = _schema(
        tmp_path,
        "script_schema",
        """
        import sys
        from pydantic import BaseModel

        class Params(BaseModel):
            x: int = 1

        sys.exit(0)
        """,
    )
    bad = tmp_path / "conf.yaml"
    bad.write_text("x: not-a-number\n")
    result = run_cli("validate", "--schema", "script_schema:Params", str(bad), env=env)
    assert result.returncode == 1, result
    assert "cannot import schema module 'script_schema'" in result.stderr
    assert "sys.exit(0)" in result.stderr
    assert "Traceback" not in result.stderr


def test_validate_names_a_yaml_merge_key(tmp_path: Path) -> None:
    """A YAML merge key (``<<``) was refused as "a tag: quote a value that starts with
    '!'", a character the file does not hold."""
    path = tmp_path / "conf.yaml"
    path.write_text("train:\n  <<: {lr: 0.3}\n")
    result = run_cli("validate", str(path))
    assert result.returncode == 1, result
    assert "merge keys ('<<') are not allowed" in result.stdout
    assert "line 2, column 3" in result.stdout
    assert "'!'" not in result.stdout


def test_a_typo_inside_a_model_given_whole_is_refused(tmp_path: Path) -> None:
    """``inner: {a: 2, zz: 1}`` (a model-typed field given whole, in a file or by
    ``--set``) passed, pydantic dropping ``zz`` without a word, while ``inner.zz``
    given alone was refused: a typo, silently lost."""
    env = _schema(tmp_path, "nested_schema", _NESTED_SCHEMA)
    path = tmp_path / "conf.yaml"
    path.write_text(
        "inner: {a: 2, zz: 1}\n"
        "by_name: {k: {a: 3, yy: {q: 1}}}\n"
        "creds: {user: bob, passwd: hunter2}\n"
    )
    schema = ("--schema", "nested_schema:Params")
    result = run_cli("validate", *schema, str(path), env=env)
    assert result.returncode == 1, result
    lines = result.stdout.splitlines()
    for key in ("inner.zz", "by_name.k.yy", "creds.passwd"):
        assert any(line.startswith(f"{path}: {key}: ") for line in lines), result.stdout
    assert "hunter2" not in result.stdout + result.stderr
    result = run_cli("get", *schema, "--set", 'inner={"a": 2, "zz": 1}', env=env)
    assert result.returncode == 1, result
    assert "inner.zz (from cli)" in result.stderr
    # What the model holds is fine, whole or not.
    path.write_text("inner: {a: 2}\nby_name: {k: {a: 3}}\ncreds: {user: bob}\n")
    result = run_cli("get", *schema, "--config", str(path), "--json", "inner", env=env)
    assert result.returncode == 0, result
    assert result.stdout.split() == ["{", '"a":', "2,", '"b":', '"x"', "}"]


def test_a_section_given_a_list_is_said_to_be_one(tmp_path: Path) -> None:
    """TOML's ``[[sampling]]`` (an array of tables) and YAML's ``- lr: 0.1`` under a
    section were refused as "a section, not one value", which does not say what is
    wrong with a list."""
    toml = tmp_path / "conf.toml"
    toml.write_text("[[sampling]]\ntop_p = 0.5\n")
    yaml = tmp_path / "conf.yaml"
    yaml.write_text("train:\n  - lr: 0.1\n")
    result = run_cli("validate", str(toml), str(yaml))
    assert result.returncode == 1, result
    assert f"{toml}: sampling: a section, not a list: set its keys (" in result.stdout
    assert f"{yaml}: train: a section, not a list: set its keys (" in result.stdout
