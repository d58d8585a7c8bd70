"""Webhooks: when a job ends, POST its outcome to the URL the job named, signed for its tenant.

Not workflow code. Deliveries follow Standard Webhooks: headers ``webhook-id`` (the same on every
retry, so the receiver can drop duplicates), ``webhook-timestamp`` and ``webhook-signature``
(``v1,`` + base64 HMAC-SHA256 of ``{id}.{timestamp}.{body}`` with the tenant's secret). The
secret lives in Redis (``keel keys webhook-secret``), read by the activity, never in history.
A URL must be on the tenant's allow-list (``KEEL_WEBHOOK_HOSTS``, JSON ``{"acme":
["hooks.acme.com:443"], "*": [...]}``), checked at submit and again here. Timeouts, 408, 429 and
5xx are retried by Temporal; any other answer is final.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import httpx
from pydantic import BaseModel
from temporalio import activity
from temporalio.exceptions import ApplicationError

from keel.activities.errors import WEBHOOK_FAILED, WEBHOOK_REFUSED
from keel.activities.redis_client import KeelRedis
from keel.activities.webhook_hosts import SECRET_KEY_PREFIX, WebhookHosts

__all__ = [
    "SECRET_KEY_PREFIX",
    "WebhookActivities",
    "WebhookDelivery",
    "WebhookHosts",
    "WebhookResult",
    "sign",
]

REQUEST_TIMEOUT_SECONDS = 10.0
"""One delivery attempt; below the activity's start-to-close timeout."""
_RETRYABLE = frozenset({408, 409, 425, 429})


class WebhookDelivery(BaseModel):
    """Input of ``deliver_webhook``: what to send where, for whom."""

    tenant: str
    url: str
    webhook_id: str
    """Stable across retries: derived from the job ID by the workflow."""
    body: dict[str, Any]


class WebhookResult(BaseModel):
    """How the receiver answered the delivery that succeeded."""

    status: int
    attempt: int


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for one delivery."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    message = f"{webhook_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, message, hashlib.sha256).digest()).decode()


class WebhookActivities:
    """The delivery activity, with its HTTP client, secrets store and allow-list."""

    def __init__(self, redis: KeelRedis, http: httpx.AsyncClient, hosts: WebhookHosts) -> None:
        self._redis, self._http, self._hosts = redis, http, hosts

    @activity.defn(name="deliver_webhook")
    async def deliver_webhook(self, delivery: WebhookDelivery) -> WebhookResult:
        """POST one signed delivery; raise for Temporal to retry, or finally.

        Raises:
            ApplicationError: ``WEBHOOK_REFUSED`` (non-retryable) when the URL is not allowed or
                the tenant has no secret; ``WEBHOOK_FAILED``, retryable for timeouts, 408, 429
                and 5xx, final for other answers.
        """
        if not self._hosts.allows(delivery.tenant, delivery.url):
            raise ApplicationError(
                "callback URL is not on the tenant's webhook allow-list",
                type=WEBHOOK_REFUSED,
                non_retryable=True,
            )
        secret = await self._redis.get(SECRET_KEY_PREFIX + delivery.tenant)
        if not secret:
            raise ApplicationError(
                "the tenant has no webhook secret", type=WEBHOOK_REFUSED, non_retryable=True
            )
        secret_text = secret.decode() if isinstance(secret, bytes) else secret
        body = json.dumps(delivery.body, separators=(",", ":"), sort_keys=True).encode()
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": delivery.webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret_text, delivery.webhook_id, timestamp, body),
        }
        try:
            response = await self._http.post(
                delivery.url, content=body, headers=headers, timeout=REQUEST_TIMEOUT_SECONDS
            )
        except httpx.HTTPError as err:
            raise ApplicationError(
                f"delivery failed: {type(err).__name__}", type=WEBHOOK_FAILED
            ) from None
        status = response.status_code
        if status >= 300:
            retryable = status >= 500 or status in _RETRYABLE
            raise ApplicationError(
                f"receiver answered {status}", type=WEBHOOK_FAILED, non_retryable=not retryable
            )
        return WebhookResult(status=status, attempt=activity.info().attempt)
