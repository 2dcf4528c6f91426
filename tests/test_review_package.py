"""hotknob as a library user meets it: the built wheel, the package's public names, and
what works in a process without torch (or any of the daemon's dependencies)."""

from __future__ import annotations

import ast
import os
import pydoc
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import hotknob.model_runtime as runtime
from hotknob.model_runtime import errors
from tests.daemon_proc import DaemonProcess

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "config": "hotknob/config",
    "daemon": "hotknob/daemon",
    "model_runtime": "hotknob/model_runtime",
}

# Put first on a child's path: ``import`` of any of these top-level names fails there, as
# in a process where they are not installed.
BLOCKER = """
import sys

_BLOCKED = {names!r}


class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, _Blocked())
"""

DAEMON_DEPS = (
    "pydantic",
    "pydantic_core",
    "pydantic_settings",
    "yaml",
    "structlog",
    "etcd3",
    "grpc",
    "google",
    "prometheus_client",
    "watchdog",
)


def _without(tmp_path: Path, *names: str) -> dict[str, str]:
    """An environment whose Python processes cannot import ``names``."""
    folder = tmp_path / "blocker"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(BLOCKER.format(names=sorted(names)))
    return {**os.environ, "PYTHONPATH": str(folder)}


# -- the public names --------------------------------------------------------------------


def test_every_runtime_error_is_importable_from_the_package() -> None:
    """``bind_optimizer`` and ``LiveSampling`` raise ``InvalidValue``: a user catches it
    where they import ``LiveConfig`` and its sibling ``DaemonUnavailable`` from."""
    from hotknob.model_runtime import InvalidValue

    assert InvalidValue is errors.InvalidValue
    raised = {
        name
        for name, obj in vars(errors).items()
        if isinstance(obj, type)
        and issubclass(obj, Exception)
        and obj.__module__ == errors.__name__
    }
    assert raised == {"LiveConfigError", "InvalidValue", "DaemonUnavailable"}
    assert raised <= set(runtime.__all__)
    for name in runtime.__all__:
        assert getattr(runtime, name) is not None


def test_help_of_the_runtime_package_lists_its_classes() -> None:
    """The public names load on first use; ``help()`` and tab completion go by ``dir()``,
    which must name them all the same."""
    assert set(runtime.__all__) <= set(dir(runtime))
    text = pydoc.plain(pydoc.render_doc(runtime))
    for name in ("LiveConfig", "DaemonUnavailable", "InvalidValue", "Handle"):
        assert f"class {name}" in text, f"help(hotknob.model_runtime) does not show {name}"


# -- the package as built ----------------------------------------------------------------


def test_the_build_backend_floor_reads_the_license_field() -> None:
    """``license = "Apache-2.0"`` (an SPDX expression) is read by setuptools 77 and
    later; an older one, which the build requirement would admit, refuses the file."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert isinstance(data["project"]["license"], str)
    wanted = [Requirement(r) for r in data["build-system"]["requires"]]
    setuptools = next(r for r in wanted if r.name == "setuptools")
    assert not setuptools.specifier.contains("76.3.0"), str(setuptools)
    assert setuptools.specifier.contains("77.0.0"), str(setuptools)


def _imported_top_levels() -> dict[str, str]:
    """Each top-level module the three packages import that is neither the standard
    library's nor hotknob's, with one file that imports it."""
    found: dict[str, str] = {}
    for folder in PACKAGES:
        for path in sorted((ROOT / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top != "hotknob":
                        found.setdefault(top, f"{folder}/{path.name}")
    return found


def test_every_imported_distribution_is_a_declared_dependency() -> None:
    """A module imported directly from a package that only another dependency pulls in
    (pydantic's own) breaks an install the day that dependency stops pulling it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["torch"]]
    declared = {canonicalize_name(Requirement(r).name) for r in wanted}
    providers = packages_distributions()
    undeclared = {
        f"{module} (imported in {where}; from {', '.join(providers.get(module, ['?']))})"
        for module, where in _imported_top_levels().items()
        if not declared & {canonicalize_name(d) for d in providers.get(module, [])}
    }
    assert not undeclared, f"imported, not declared in pyproject.toml: {sorted(undeclared)}"


def _build_wheel(tmp_path: Path) -> Path:
    """A wheel built from a copy of the sources (the build writes next to them)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in PACKAGES:
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "dist"
    code = f"from setuptools import build_meta as b; print(b.build_wheel({str(out)!r}))"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=50
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return out / done.stdout.strip().splitlines()[-1]


def test_the_wheel_holds_every_module_and_runs_from_itself(tmp_path: Path) -> None:
    """A module missing from the package list breaks only installs, never the checkout."""
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp_path / "site")
    for folder, home in PACKAGES.items():
        for path in (ROOT / folder).iterdir():
            if path.suffix == ".py" or path.name == "py.typed":
                assert f"{home}/{path.name}" in names, f"{home}/{path.name} is not in the wheel"
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "hotknob = hotknob.daemon.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
    # Only the unpacked wheel and the dependencies: no checkout, no editable finder (-S).
    deps = next(p for p in sys.path if p.endswith("site-packages"))
    code = textwrap.dedent(
        """
        import hotknob.daemon.cli, hotknob.model_runtime.client, hotknob.config
        from hotknob.model_runtime import LiveConfig
        print(hotknob.daemon.cli.__file__)
        print(LiveConfig.__module__)
        """
    )
    done = subprocess.run(
        [sys.executable, "-S", "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), deps])},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[0].startswith(str(tmp_path / "site"))


# -- without torch -----------------------------------------------------------------------


def test_daemon_and_runtime_run_without_torch(tmp_path: Path) -> None:
    """The daemon needs no torch; a process's runtime needs neither torch nor any of the
    daemon's dependencies until a torch binding is used, and then says what is missing."""
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  lr: 0.01\n")
    daemon = DaemonProcess(tmp_path, configs=[config], env=_without(tmp_path, "torch", "numpy"))
    with daemon:
        script = textwrap.dedent(
            f"""
            import sys
            from hotknob.model_runtime import LiveConfig
            live = LiveConfig.connect({str(daemon.socket_path)!r}, timeout=20)
            seen = []
            live.on_change("train.lr", seen.append)
            live.report(1, loss=0.5)
            saved = live.state_dict()
            live.load_state_dict(saved)
            print(live["train.lr"], live.apply(2))
            try:
                live.bind_optimizer(object())
            except ImportError as exc:
                print("bind_optimizer:", exc)
            finally:
                live.close()
            """
        )
        env = _without(tmp_path, "torch", "numpy", *DAEMON_DEPS)
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=40, env=env
        )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "0.01 False"
    assert lines[1].startswith("bind_optimizer: bind_optimizer needs torch"), lines[1]
    assert "pip install" in lines[1], lines[1]


def test_config_errors_come_back_whole_from_a_pickle() -> None:
    """A configuration checked in a process pool sends its error back pickled: the errors
    whose constructor takes more than a message must come back whole, not raise in
    ``pickle.loads`` or come back with their message split into characters."""
    import pickle

    from hotknob.config import InvalidChange, LayerError, Problem

    problem = Problem("train.lr", "cli", "must be > 0", -1, "--set")
    for error in (
        InvalidChange([problem]),
        LayerError("files", "a.yaml: not valid YAML", key="train.lr"),
    ):
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is type(error) and str(back) == str(error)
        assert vars(back) == vars(error)
