"""Telling others about a job: the workflow to signal, and the webhook to call.

Deterministic orchestration. ``notify_workflow`` is signalled with the ``JobResult`` when the job
ends (``NOTIFY_SIGNAL``) and, for a session's turns (``notify_questions``), with each question
it asks (``QUESTION_SIGNAL``); ``callback_url`` is POSTed the outcome by an activity. Neither a
missing listener nor a failed delivery ever fails the job: each becomes an event.
"""

from __future__ import annotations

from collections.abc import Callable

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from keel.activities.webhooks import WebhookActivities, WebhookDelivery
    from keel.workflows import policies
    from keel.workflows.types import NOTIFY_SIGNAL, QUESTION_SIGNAL, JobRequest, JobResult


class Notifier:
    """One job's outgoing notices."""

    def __init__(self, req: JobRequest, event: Callable[[str, str], None]) -> None:
        self._req, self._event = req, event

    async def finished(self, result: JobResult) -> None:
        """The job ended: signal ``notify_workflow`` and call ``callback_url``, if set."""
        if self._req.notify_workflow:
            await self._signal(self._req.notify_workflow, NOTIFY_SIGNAL, result)
        if self._req.callback_url:
            await self._deliver(self._req.callback_url, result)

    async def question(self, text: str) -> None:
        """The job asked ``text``: tell the session that runs it, when one asked to know."""
        if self._req.notify_questions and self._req.notify_workflow:
            await self._signal(self._req.notify_workflow, QUESTION_SIGNAL, text)

    async def _deliver(self, url: str, result: JobResult) -> None:
        """POST the outcome to the job's callback URL; a failed delivery never fails the job."""
        delivery = WebhookDelivery(
            tenant=self._req.tenant,
            url=url,
            # The same on every retry: receivers dedupe on it.
            webhook_id=f"msg_{workflow.info().workflow_id}",
            body={"type": "job.finished", "data": result.model_dump(mode="json")},
        )
        config = policies.WEBHOOK.copy()
        config["summary"] = "webhook"
        try:
            await workflow.execute_activity_method(
                WebhookActivities.deliver_webhook, delivery, **config
            )
            self._event("webhook_delivered", "")
        except ActivityError as err:
            self._event("webhook_failed", str(err.cause)[:200])

    async def _signal(self, workflow_id: str, name: str, arg: object) -> None:
        try:
            handle = workflow.get_external_workflow_handle(workflow_id)
            await handle.signal(name, arg)
        except Exception as err:  # noqa: BLE001 - a missing listener must not fail the job
            self._event("notify_failed", f"{workflow_id}: {err}"[:200])
