"""Deterministic orchestration of Keel agent jobs.

This package module imports nothing of its own: the workflow sandbox re-imports it for every
run, and anything imported here outside ``imports_passed_through`` would be loaded twice and
its pydantic classes would no longer match the ones the data converter builds.
"""

TASK_QUEUE = "keel-interactive"
"""Default task queue for agent jobs and their activities."""

WORKFLOW_TYPE = "AgentLoopWorkflow"
"""Workflow type name, for visibility queries."""
