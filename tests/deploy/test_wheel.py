"""The built wheel installs one top-level package, ``keel``, beside an application's own modules.

An application with its own ``client``, ``workers`` and ``workflows`` modules (common names)
must keep them when it installs Keel, and Keel must import as ``keel.*`` from the wheel alone,
not from this checkout.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

APP_CHECK = """
import importlib.resources, sys
import client, workers, workflows
assert (client.OWNER, workers.OWNER, workflows.OWNER) == ("app",) * 3, "app modules replaced"
import keel
from keel.client import AgentJobs, JobRequest
import keel.workers.registry, keel.workflows.agent_loop, keel.activities.llm
assert keel.__file__.startswith(sys.argv[1]), keel.__file__
assert importlib.resources.files("keel").joinpath("py.typed").is_file()
assert AgentJobs.__module__.startswith("keel.client")
print("ok", keel.__file__)
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(out), str(ROOT)],
        check=True,
        timeout=120,
    )
    (built,) = out.glob("keel_temporal-*.whl")
    return built


def test_wheel_ships_only_the_keel_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"keel"}
    for sub in ("client", "workers", "workflows", "activities"):
        assert f"keel/{sub}/__init__.py" in names
    assert "keel/py.typed" in names
    entry = (
        zipfile.ZipFile(wheel)
        .read(next(n for n in names if n.endswith("entry_points.txt")))
        .decode()
    )
    assert "keel = keel.workers.cli:main" in entry


def test_installs_beside_an_app_with_its_own_client_and_workers(
    wheel: Path, tmp_path: Path
) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target)]
        + [str(wheel)],
        check=True,
        timeout=120,
    )
    assert not {"client", "workers", "workflows", "activities"} & {p.name for p in target.iterdir()}
    app = tmp_path / "app"
    (app / "workers").mkdir(parents=True)
    (app / "client.py").write_text('OWNER = "app"\n')
    (app / "workers" / "__init__.py").write_text('OWNER = "app"\n')
    (app / "workflows.py").write_text('OWNER = "app"\n')
    run = subprocess.run(
        [sys.executable, "-c", APP_CHECK, str(target)],
        cwd=app,
        env={"PYTHONPATH": f"{app}:{target}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("ok ")
