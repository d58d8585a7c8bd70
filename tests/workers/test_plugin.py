"""KeelPlugin hosts Keel in someone else's worker, beside that team's own workflow.

The client is connected with nothing but the plugin (no data converter of its own), the worker
registers only the team's workflow and activity, and one Keel job plus one of the team's own
workflows both run on it. With tracing on, one trace follows the job from the client's start
through the workflow and every activity, and the model calls carry GenAI attributes.
"""

from __future__ import annotations

import uuid

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from keel.activities.llm import LLMConfig
from keel.client import AgentJobs, JobRequest
from keel.client.plugin import KeelClientPlugin
from keel.client.telemetry import tracing_configured
from keel.workers.plugin import KeelPlugin
from keel.workers.registry import build_deps
from tests.conftest import unique
from tests.workers._team import TeamWorkflow, shout


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # once per process; later calls are ignored
    return exporter


def deps_for(redis_url: str, sim_url: str):  # type: ignore[no-untyped-def]
    return build_deps(
        redis_url=redis_url,
        openai_base_url=sim_url,
        openai_api_key="sim-local-key",
        llm_config=LLMConfig(
            planner_model="sim-small", verifier_model="sim-small", answerer_model="sim-small"
        ),
        http_allowed_hosts=["127.0.0.1"],
    )


async def connect_with_plugin(env: WorkflowEnvironment, plugin: KeelClientPlugin) -> Client:
    config = env.client.service_client.config
    return await Client.connect(
        config.target_host, namespace=env.client.namespace, plugins=[plugin]
    )


async def test_keel_runs_inside_a_foreign_worker_beside_its_own_workflow(
    env: WorkflowEnvironment, redis_url: str, sim_url: str
) -> None:
    plugin = KeelPlugin(deps_for(redis_url, sim_url), tracing=False, close_deps=True)
    client = await connect_with_plugin(env, plugin)
    queue = f"team-{uuid.uuid4()}"
    worker = Worker(
        client,
        task_queue=queue,
        workflows=[TeamWorkflow],
        activities=[shout],
        max_cached_workflows=0,
    )
    async with worker:
        jobs = AgentJobs(client, task_queue=queue)
        job_id = await jobs.start(
            JobRequest(goal="What is 6 * 7? Use the calculator.", tools=["calculator"]),
            request_key=unique("plugin"),
        )
        own = await client.execute_workflow(
            TeamWorkflow.run, "ahoy", id=unique("team"), task_queue=queue
        )
        result = await jobs.result(job_id, timeout=120)
    assert own == "AHOY"
    assert result.outcome == "completed" and "42" in (result.answer or "")
    names = {type(i).__name__ for i in worker.config(active_config=True).get("interceptors", [])}
    assert names == {"JitteredBackoff", "CarryAttemptCharges"}
    assert {w.__name__ for w in worker.config(active_config=True).get("workflows", [])} == {
        "TeamWorkflow",
        "AgentLoopWorkflow",
        "SessionWorkflow",
    }
    assert plugin.deps is not None and plugin._running == 0


async def test_client_plugin_alone_reads_keel_payloads_as_models(
    env: WorkflowEnvironment, make_worker
) -> None:
    client = await connect_with_plugin(env, KeelClientPlugin(tracing=False))
    async with make_worker(env.client) as worker:
        jobs = AgentJobs(client, task_queue=worker.task_queue)
        job_id = await jobs.start(JobRequest(goal="What is 1 + 1? use calculator"))
        result = await jobs.result(job_id, timeout=120)
        status = await jobs.status(job_id)
    assert result.outcome == "completed"
    assert status.job_id == job_id and status.usage.tokens == result.usage.tokens


def test_a_foreign_data_converter_is_refused_not_silently_replaced() -> None:
    from temporalio.converter import DataConverter

    plugin = KeelClientPlugin(tracing=False)
    custom = DataConverter()
    with pytest.raises(ValueError, match="DATA_CONVERTER"):
        plugin.configure_client({"data_converter": custom})  # type: ignore[typeddict-item]


def test_tracing_follows_the_standard_otel_variables() -> None:
    assert not tracing_configured({})
    assert tracing_configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert tracing_configured({"OTEL_TRACES_EXPORTER": "console"})
    assert not tracing_configured({"OTEL_TRACES_EXPORTER": "none"})
    assert not tracing_configured(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318", "OTEL_SDK_DISABLED": "true"}
    )


async def test_one_trace_follows_a_job_from_submit_through_every_activity(
    env: WorkflowEnvironment, redis_url: str, sim_url: str, spans: InMemorySpanExporter
) -> None:
    spans.clear()
    plugin = KeelPlugin(deps_for(redis_url, sim_url), tracing=True, close_deps=True)
    assert plugin.tracing
    client = await connect_with_plugin(env, plugin)
    queue = f"traced-{uuid.uuid4()}"
    async with Worker(client, task_queue=queue, max_cached_workflows=0):
        jobs = AgentJobs(client, task_queue=queue)
        job_id = await jobs.start(
            JobRequest(goal="What is 3 * 5? use calculator", tools=["calculator"])
        )
        result = await jobs.result(job_id, timeout=120)
    assert result.outcome == "completed"
    finished = spans.get_finished_spans()
    start = [s for s in finished if s.name == "StartWorkflow:AgentLoopWorkflow"]
    assert len(start) == 1
    trace_id = start[0].context.trace_id
    in_trace = [s for s in finished if s.context.trace_id == trace_id]
    names = {s.name for s in in_trace}
    assert {"RunWorkflow:AgentLoopWorkflow", "RunActivity:plan_step"} <= names
    assert {"RunActivity:execute_tool", "RunActivity:draft_answer"} <= names
    assert "RunActivity:verify_draft" in names
    model_calls = [s for s in in_trace if s.attributes.get("gen_ai.operation.name") == "chat"]
    assert len(model_calls) >= 4  # route, plan, answer, verify
    for span in model_calls:
        attrs = span.attributes
        # The roles are pinned to sim-small; the router runs on its own tier's model.
        assert attrs["gen_ai.request.model"] in ("sim-small", "gpt-4.1-nano")
        assert attrs["gen_ai.usage.input_tokens"] > 0
        assert attrs["gen_ai.usage.output_tokens"] > 0
        assert "sim-local-key" not in str(dict(attrs))
