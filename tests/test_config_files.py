"""Reading a config file: each format, what makes one unreadable and the error that says
so, a byte order mark, and the nesting limit."""

from __future__ import annotations

from pathlib import Path

import pytest

from hotknob.config import LayerError, read_config_file
from hotknob.config.files import MAX_FILE_DEPTH


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
