"""Deterministic orchestration of Keel agent jobs.

This package module imports nothing of its own: the workflow sandbox re-imports it for every
run, and anything imported here outside ``imports_passed_through`` would be loaded twice and
its pydantic classes would no longer match the ones the data converter builds.
"""

TASK_QUEUE = "keel-interactive"
"""Default task queue for agent jobs and their activities."""

BATCH_TASK_QUEUE = "keel-batch"
"""Task queue for batch jobs, so a backlog of them never delays interactive ones."""

TASK_QUEUES = {"interactive": TASK_QUEUE, "batch": BATCH_TASK_QUEUE}
"""Task queue for each ``JobRequest.mode``."""

WORKFLOW_TYPE = "AgentLoopWorkflow"
"""Workflow type name, for visibility queries."""
SESSION_WORKFLOW_TYPE = "SessionWorkflow"
"""The workflow type of a session (``workflows/session.py``)."""
