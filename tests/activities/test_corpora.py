"""Named corpora: a job searches its tenant's corpora and the shared ones, never another
tenant's and never a folder it names itself (unless an operator started it); indexes are
bounded and their scan stops when the activity is cancelled."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from temporalio.client import Client
from temporalio.exceptions import ApplicationError

from keel.activities.corpora import Corpora
from keel.activities.errors import CORPUS_TOO_LARGE, DOCS_NOT_FOUND
from keel.activities.retrieval import Retriever, _scan
from keel.client import AgentJobs, InvalidJobRequest, JobRequest
from tests.conftest import unique


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    made = {}
    for name, text in (("shared", "Keel budgets every call."), ("acme", "Acme ships rockets.")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "doc.md").write_text(text)
        made[name] = tmp_path / name
    return made


def corpora_for(folders: dict[str, Path]) -> Corpora:
    return Corpora(
        {"*": {"docs": str(folders["shared"])}, "acme": {"handbook": str(folders["acme"])}}
    )


def test_names_resolve_per_tenant_then_shared(folders: dict[str, Path]) -> None:
    corpora = corpora_for(folders)
    assert corpora.resolve("acme", "handbook") == str(folders["acme"])
    assert corpora.resolve("acme", "docs") == str(folders["shared"])
    assert corpora.resolve("globex", "handbook") is None  # another tenant's: not found
    assert corpora.visible("globex") == ["docs"]
    assert Corpora.from_env({"KEEL_CORPORA": '{"*": {"a": "/x"}}'}).visible("t") == ["a"]
    for bad in ("[1]", '{"*": {"bad name": "/x"}}', "{nope"):
        with pytest.raises(ValueError, match="KEEL_CORPORA"):
            Corpora.from_env({"KEEL_CORPORA": bad})


async def test_the_retriever_searches_only_what_the_tenant_may(folders: dict[str, Path]) -> None:
    retriever = Retriever(corpora=corpora_for(folders))
    hits = await retriever.search("corpus:handbook", "rockets", tenant="acme")
    assert hits and "rockets" in hits[0].snippet
    with pytest.raises(ApplicationError) as foreign:
        await retriever.search("corpus:handbook", "rockets", tenant="globex")
    assert foreign.value.type == DOCS_NOT_FOUND and foreign.value.non_retryable
    assert "rockets" not in str(foreign.value)


def test_indexes_are_bounded_and_the_scan_stops_when_asked(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"{i}.md").write_text("x" * 100)
    with pytest.raises(ApplicationError) as files:
        _scan(tmp_path, max_files=2)
    assert files.value.type == CORPUS_TOO_LARGE and files.value.non_retryable
    with pytest.raises(ApplicationError):
        _scan(tmp_path, max_bytes=250)
    assert len(_scan(tmp_path)) == 3
    stop = threading.Event()
    stop.set()
    with pytest.raises(InterruptedError):
        _scan(tmp_path, stop)


async def test_submit_refuses_folders_for_tenants_and_unknown_corpora(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "KEEL_CORPORA", '{"*": {"docs": "/srv/docs"}, "acme": {"handbook": "/srv/a"}}'
    )
    acme = AgentJobs(client, tenant="acme", task_queue=unique("idle"))
    for docs, why in (("/", "not a folder"), ("corpus:secrets", "unknown corpus")):
        with pytest.raises(InvalidJobRequest) as refused:
            await acme.start(JobRequest(goal="hi", docs_dir=docs))
        assert refused.value.field == "docs_dir" and why in refused.value.message
    globex = AgentJobs(client, tenant="globex", task_queue=unique("idle"))
    with pytest.raises(InvalidJobRequest, match="unknown corpus 'handbook'"):
        await globex.start(JobRequest(goal="hi", docs_dir="corpus:handbook"))
    job_id = await acme.start(JobRequest(goal="hi", docs_dir="corpus:handbook"))
    await client.get_workflow_handle(job_id).terminate("test over")


async def test_a_job_searches_its_named_corpus(
    client: Client, make_worker, folders: dict[str, Path]
) -> None:
    corpora = {"*": {"docs": str(folders["shared"])}, "acme": {"handbook": str(folders["acme"])}}
    async with make_worker(client, corpora=corpora) as worker:
        jobs = AgentJobs(client, task_queue=worker.task_queue, tenant="acme")
        req = JobRequest(
            goal="What does Acme ship?", tools=["calculator"], docs_dir="corpus:handbook"
        )
        result = await jobs.result(await jobs.start(req), timeout=120)
    assert result.outcome == "completed" and "rockets" in (result.answer or "")
