"""deploy/temporal-compose.yml and deploy/Dockerfile, checked without a Docker engine.

The file is parsed and checked against the project it deploys (search attributes, the ``keel``
command, the wheel's packages, the worker's settings); the namespace and search-attribute job's
own shell script runs against a real Temporal dev server. ``docker compose config`` runs only
where the Compose plugin is installed.
"""

from __future__ import annotations

import asyncio
import fnmatch
import graphlib
import os
import re
import shutil
import subprocess
import tomllib
import uuid
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.envconfig import ClientConfig
from temporalio.testing import WorkflowEnvironment

from keel.client._validation import validate_request_key
from keel.client.errors import InvalidJobRequest
from keel.workflows import search_attributes as sa
from keel.workflows.types import job_id_for
from tests.conftest import venv_bin

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "temporal-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"

REQUIRED_SERVICES = {
    "postgresql",
    "temporal-schema",
    "temporal",
    "temporal-setup",
    "temporal-ui",
    "redis",
    "worker",
    "codec",
}
ONE_SHOT = {"temporal-schema", "temporal-setup"}
CLI_TYPE = {"keyword": "Keyword", "double": "Double", "int": "Int", "bool": "Bool"}
# Pre-allocated custom search attribute columns in schema/postgresql/v12/visibility/schema.sql.
POSTGRES_SA_SLOTS = {"Keyword": 10, "Double": 3, "Int": 3, "Bool": 3, "Datetime": 3, "Text": 3}
SCHEMA_DIR = "/etc/temporal/schema/postgresql/v12"
SECRET_WORDS = ("PASSWORD", "PWD", "KEY", "SECRET", "TOKEN")

# Compose interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}, ...
INTERPOLATION = re.compile(
    r"\$\{(?P<var>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
)
REQUIRED_REF = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*:?\?[^}]*\}$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def depends_of(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in deps.items()}


def script_of(service: dict[str, Any]) -> str:
    """The shell script a one-shot job runs, as the shell will see it."""
    assert service["entrypoint"][0] == "/bin/sh" and service["entrypoint"][-1].endswith("c")
    (script,) = service["command"]
    assert INTERPOLATION.search(script.replace("$$", "")) is None, "compose would expand this"
    return script.replace("$$", "$")


def interpolate(value: str, env: dict[str, str]) -> str:
    def substitute(match: re.Match[str]) -> str:
        var, op, arg = match["var"], match["op"] or "", match["arg"] or ""
        present = var in env and (env[var] != "" or not op.startswith(":"))
        if op.endswith("?") and not present:
            raise KeyError(f"{var} is required: {arg}")
        if op.endswith("-") and not present:
            return arg
        return env.get(var, "")

    return INTERPOLATION.sub(substitute, value.replace("$$", "\0")).replace("\0", "$")


def strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for key, value in node.items() for s in strings(key) + strings(value)]
    if isinstance(node, list):
        return [s for item in node for s in strings(item)]
    return []


def seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert "".join(n + u for n, u in parts) == duration, f"not a compose duration: {duration}"
    return sum(float(n) * units[u] for n, u in parts)


def registered_search_attributes(script: str) -> list[tuple[str, str]]:
    return re.findall(r"search-attribute create\b.*--name\s+(\w+)\s+--type\s+(\w+)", script)


def expected_search_attributes() -> dict[str, str]:
    return {k.name: CLI_TYPE[k.indexed_value_type.name.lower()] for k in sa.ALL_KEYS}


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def test_required_services_exist(services: dict[str, Any]) -> None:
    assert REQUIRED_SERVICES <= services.keys()


def test_every_image_is_pinned(services: dict[str, Any]) -> None:
    for name, service in services.items():
        if "build" in service:
            assert (COMPOSE_FILE.parent / service["build"]["context"]).is_dir(), name
            assert (ROOT / service["build"]["dockerfile"]).is_file(), name
            continue
        image = service["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and "/" not in tag, f"{name}: {image} has no tag"
        assert tag and tag != "latest", f"{name}: {image} is not pinned"


def test_temporal_images_share_a_version(services: dict[str, Any]) -> None:
    server_tag = services["temporal"]["image"].rpartition(":")[2]
    assert services["temporal"]["image"].startswith("temporalio/server:")
    for job in ONE_SHOT:
        assert services[job]["image"] == f"temporalio/admin-tools:{server_tag}", job


def test_depends_on_graph(services: dict[str, Any]) -> None:
    graph = {name: depends_of(service) for name, service in services.items()}
    for name, deps in graph.items():
        assert deps.keys() <= services.keys(), f"{name} depends on a missing service"
    order = list(graphlib.TopologicalSorter({n: set(d) for n, d in graph.items()}).static_order())
    assert order.index("temporal-schema") < order.index("temporal") < order.index("worker")

    assert graph["temporal-schema"] == {"postgresql": "service_healthy"}
    assert graph["temporal"] == {"temporal-schema": "service_completed_successfully"}
    assert graph["temporal-setup"] == {"temporal": "service_healthy"}
    assert graph["temporal-ui"] == {"temporal": "service_healthy"}
    assert graph["worker"]["temporal-setup"] == "service_completed_successfully"
    assert graph["worker"]["redis"] == "service_healthy"
    for deps in graph.values():
        for dep, condition in deps.items():
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{dep} is awaited healthy but has none"


def test_long_running_services_have_healthcheck_and_restart(services: dict[str, Any]) -> None:
    awaited_to_finish = {
        dep
        for service in services.values()
        for dep, condition in depends_of(service).items()
        if condition == "service_completed_successfully"
    }
    assert awaited_to_finish == ONE_SHOT
    for name, service in services.items():
        if name in ONE_SHOT:
            assert service.get("restart", "no") == "no", f"{name} would loop"
            continue
        check = service.get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"
        assert service.get("restart") in {"always", "unless-stopped"}, f"{name} is not restarted"


def test_worker_is_scalable(services: dict[str, Any]) -> None:
    worker = services["worker"]
    assert "container_name" not in worker
    assert "hostname" not in worker
    assert not worker.get("ports")


def test_compose_interpolation_is_well_formed(compose: dict[str, Any]) -> None:
    for text in strings(compose):
        unescaped = INTERPOLATION.sub("", text.replace("$$", ""))
        assert "$" not in unescaped, f"bare $ that compose would expand: {text!r}"


def test_no_literal_secrets(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for key, value in env_of(service).items():
            if any(word in key.upper() for word in SECRET_WORDS):
                assert "${" in value, f"{name}.{key} is a literal"
            if set(key.upper().split("_")) & set(SECRET_WORDS) or "PASSWORD" in key.upper():
                assert REQUIRED_REF.match(value), f"{name}.{key} must be a required ${{VAR:?}}"


def test_worker_environment_wiring(services: dict[str, Any]) -> None:
    env = env_of(services["worker"])
    published = {str(p).rsplit(":", 1)[-1] for p in services["temporal"]["ports"]}
    assert "7233" in published
    assert env["TEMPORAL_ADDRESS"] == "temporal:7233"
    assert env["TEMPORAL_NAMESPACE"] == env_of(services["temporal-setup"])["TEMPORAL_NAMESPACE"]
    redis = urlsplit(env["REDIS_URL"])
    assert (redis.scheme, redis.hostname, redis.port) == ("redis", "redis", 6379)
    assert "redis" in services
    assert REQUIRED_REF.match(env["OPENAI_API_KEY"])
    assert INTERPOLATION.fullmatch(env["OPENAI_BASE_URL"])
    for key in ("KEEL_MODEL_PLANNER", "KEEL_MODEL_VERIFIER", "KEEL_MODEL_ANSWERER"):
        match = INTERPOLATION.fullmatch(env[key])
        assert match and match["var"] == key and match["op"] == ":-" and match["arg"], key


def resolved_worker_env(services: dict[str, Any]) -> dict[str, str]:
    host = {"OPENAI_API_KEY": "sk-test-not-a-key", "POSTGRES_PASSWORD": "unused"}
    return {k: interpolate(v, host) for k, v in env_of(services["worker"]).items()}


def test_worker_settings_accept_the_compose_environment(
    services: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from keel.workers.settings import WorkerSettings

    env = resolved_worker_env(services)
    for key in os.environ:
        if key.startswith(("KEEL_", "OPENAI_", "TEMPORAL_")) or key == "REDIS_URL":
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = WorkerSettings()
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.openai_api_key.get_secret_value() == "sk-test-not-a-key"
    assert settings.allowed_hosts() == []
    for key in env:
        if key.startswith("KEEL_"):
            field = key.removeprefix("KEEL_").lower()
            assert field in WorkerSettings.model_fields, f"{key} is not a worker setting"

    connect = ClientConfig.load_client_connect_config(disable_file=True, override_env_vars=env)
    assert connect["target_host"] == "temporal:7233"
    assert connect["namespace"] == "default"


def test_worker_healthcheck_reads_the_metrics_port(services: dict[str, Any]) -> None:
    from keel.workers.settings import WorkerSettings

    env = resolved_worker_env(services)
    check = " ".join(services["worker"]["healthcheck"]["test"])
    port = re.search(r"http://127\.0\.0\.1:(\d+)/metrics", check)
    assert port and port[1] == env["KEEL_METRICS_PORT"]
    assert "metrics_port" in WorkerSettings.model_fields


def test_worker_command_is_a_keel_command(services: dict[str, Any], pyproject: Any) -> None:
    from keel.workers.cli import app

    command = services["worker"]["command"]
    assert command == ["keel", "worker"]
    assert pyproject["project"]["scripts"]["keel"] == "keel.workers.cli:main"
    names = [c.name or c.callback.__name__ for c in app.registered_commands if c.callback]
    assert "worker" in names
    cmd = [i for i in dockerfile_instructions() if i[0] == "CMD"]
    assert cmd and yaml.safe_load(cmd[-1][1]) == command


def test_the_ui_decodes_payloads_through_the_codec_service(services: dict[str, Any]) -> None:
    import typer

    from keel.workers.cli import app

    codec, ui = services["codec"], services["temporal-ui"]
    argv = [interpolate(arg, {}) for arg in codec["command"]]
    assert argv[:2] == ["keel", "codec-server"]
    group = typer.main.get_command(app)
    command = group.get_command(group.context_class(group), argv[1])  # type: ignore[attr-defined]
    assert command is not None, "keel has no codec-server command"
    parsed = command.make_context(argv[1], argv[2:]).params
    # The browser calls the codec, so the UI's endpoint is the host port the codec publishes,
    # and the codec admits the origin the UI is published on.
    endpoint = urlsplit(interpolate(env_of(ui)["TEMPORAL_CODEC_ENDPOINT"], {}))
    assert codec["ports"] == [f"127.0.0.1:{endpoint.port}:{parsed['port']}"]
    ui_port = ui["ports"][0].rsplit(":", 2)[1]
    assert parsed["cors_origin"] == [f"http://localhost:{ui_port}"]
    assert parsed["host"] == "0.0.0.0"
    check = " ".join(codec["healthcheck"]["test"])
    assert f"http://127.0.0.1:{parsed['port']}/healthz" in check


def test_graceful_shutdown_fits_the_stop_grace_period(services: dict[str, Any]) -> None:
    worker = services["worker"]
    shutdown = float(resolved_worker_env(services)["KEEL_GRACEFUL_SHUTDOWN_SECONDS"])
    assert seconds(str(worker["stop_grace_period"])) >= shutdown + 10
    assert worker.get("stop_signal", "SIGTERM") == "SIGTERM"


def test_search_attributes_match_the_workflow_keys(services: dict[str, Any]) -> None:
    registered = registered_search_attributes(script_of(services["temporal-setup"]))
    assert len(registered) == len(dict(registered)), "an attribute is registered twice"
    assert dict(registered) == expected_search_attributes()


def test_search_attributes_fit_postgres_visibility() -> None:
    for kind, count in Counter(expected_search_attributes().values()).items():
        assert count <= POSTGRES_SA_SLOTS[kind], f"{count} {kind} attributes; Postgres has fewer"


def test_schema_job_sets_up_both_databases(services: dict[str, Any]) -> None:
    script = script_of(services["temporal-schema"])
    assert "--plugin postgres12" in script
    for db, schema in (("temporal", "temporal"), ("temporal_visibility", "visibility")):
        assert f"--db {db} create" in script
        assert f"--db {db} setup-schema -v 0.0" in script
        assert f"--db {db} update-schema -d {SCHEMA_DIR}/{schema}/versioned" in script
    assert env_of(services["temporal"])["DB"] == "postgres12"
    assert env_of(services["temporal-schema"])["POSTGRES_SEEDS"] == "postgresql"
    assert env_of(services["temporal"])["POSTGRES_SEEDS"] == "postgresql"


def test_dynamic_config_is_mounted_and_fits_keel_ids(services: dict[str, Any]) -> None:
    temporal = services["temporal"]
    path = env_of(temporal)["DYNAMIC_CONFIG_FILE_PATH"]
    mounts = [str(v).split(":") for v in temporal["volumes"]]
    host = [src for src, target, *_ in mounts if path.startswith(target.rstrip("/") + "/")]
    assert len(host) == 1, f"{path} is not inside a mounted folder"
    target = next(t for s, t, *_ in mounts if s == host[0])
    config_file = COMPOSE_FILE.parent / host[0] / path.removeprefix(target).lstrip("/")
    config = yaml.safe_load(config_file.read_text())

    longest_key = max(n for n in range(1, 300) if _valid_request_key("a" * n))
    max_id = config["limit.maxIDLength"][0]["value"]
    longest_tenant = "t" * 64  # IDENT_RE allows 64 characters
    assert len(job_id_for(longest_tenant, "k" * longest_key)) <= max_id <= 255
    # Keel's priority and fairness keys are honoured only with the fair matcher on.
    assert config["matching.enableFairness"][0]["value"] is True


def _valid_request_key(key: str) -> bool:
    try:
        validate_request_key(key)
    except InvalidJobRequest:
        return False
    return True


def test_dockerfile_builds_the_wheel_as_a_non_root_worker(pyproject: Any) -> None:
    instructions = dockerfile_instructions()
    assert [arg for op, arg in instructions if op == "FROM"] == ["python:3.11-slim"]
    copied = set()
    for op, arg in instructions:
        if op == "COPY":
            *sources, _dest = [a for a in arg.split() if not a.startswith("--")]
            copied |= {s.rstrip("/") for s in sources}
    packages = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    assert set(packages) | {"pyproject.toml", pyproject["project"]["readme"]} <= copied
    # keel/ links to the folders at the root: the image needs the folders as well as the links.
    linked = {p.name for p in (ROOT / "keel").iterdir() if p.is_symlink()}
    assert linked == {"workflows", "activities", "workers", "client"}
    assert linked <= copied
    assert any(op == "RUN" and "pip install --no-cache-dir ." in arg for op, arg in instructions)
    users = [arg for op, arg in instructions if op == "USER"]
    assert users and users[-1] not in {"root", "0"}
    assert ("STOPSIGNAL", "SIGTERM") in instructions


def test_dockerignore_keeps_local_state_out_and_sources_in(pyproject: Any) -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for needed in (".git", ".venv", ".keel", ".env", ".pytest_cache", "**/__pycache__"):
        assert needed in patterns, needed
    packages = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    linked = [p.name for p in (ROOT / "keel").iterdir() if p.is_symlink()]
    for kept in [*packages, *linked, "pyproject.toml", "README.md"]:
        assert not any(fnmatch.fnmatch(kept, p) for p in patterns), f"{kept} is ignored"


async def test_setup_job_registers_keel_search_attributes(
    services: dict[str, Any], env: WorkflowEnvironment, request: pytest.FixtureRequest
) -> None:
    if request.config.getoption("--workflow-environment") != "local":
        pytest.skip("creates a namespace: runs only against the throwaway local dev server")
    temporal = Path(venv_bin("temporal"))
    namespace = f"keel-compose-{uuid.uuid4().hex[:12]}"
    job_env = {
        **os.environ,
        "PATH": f"{temporal.parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "TEMPORAL_ADDRESS": env.client.service_client.config.target_host,
        "TEMPORAL_NAMESPACE": namespace,
        "NAMESPACE_RETENTION": "24h",
    }
    service = services["temporal-setup"]
    for _ in range(2):  # the second run proves the job is safe to repeat
        proc = await asyncio.create_subprocess_exec(
            *service["entrypoint"],
            script_of(service),
            env=job_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=240)
        assert proc.returncode == 0, out.decode()
    listed = await env.client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=namespace)
    )
    assert dict(listed.custom_attributes) == {
        k.name: k.indexed_value_type.value for k in sa.ALL_KEYS
    }


def test_docker_compose_config_accepts_the_file() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker client on this machine")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("the docker compose plugin is not installed here")
    run_env = {**os.environ, "POSTGRES_PASSWORD": "test-only", "OPENAI_API_KEY": "test-only"}
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE_FILE), "config", "--quiet"],
        capture_output=True,
        text=True,
        env=run_env,
    )
    assert result.returncode == 0, result.stderr
