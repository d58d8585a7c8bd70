"""structlog configuration for every Keel process: JSON when not on a terminal, always stderr.

Activities bind ``job_id`` and ``tenant`` with ``structlog.contextvars``; the SDK's own
``temporalio`` loggers go through the same renderer, with the activity or workflow they speak of
lifted from the record into fields (``job_id``, ``activity``, ``attempt``), not left in the text.
"""

from __future__ import annotations

import logging
import sys

import httpx
import structlog
import temporalio.activity
import temporalio.workflow

_TEMPORAL_EXTRAS = ("temporal_activity", "temporal_workflow")
"""Where the SDK's logger adapters put the activity's or workflow's details on a log record."""


def _temporal_fields(
    _logger: object, _name: str, event_dict: structlog.types.EventDict
) -> structlog.types.EventDict:
    """Give an SDK log record the job it is about: the workflow ID is Keel's job ID."""
    record = event_dict.get("_record")
    for extra in _TEMPORAL_EXTRAS:
        details = getattr(record, extra, None)
        if isinstance(details, dict):
            event_dict.setdefault("job_id", details.get("workflow_id"))
            if "activity_type" in details:
                event_dict.setdefault("activity", details["activity_type"])
            event_dict.setdefault("attempt", details.get("attempt"))
            break
    return event_dict


def configure_logging(level: str = "INFO", *, json_logs: bool | None = None) -> None:
    """Configure structlog and stdlib logging once per process.

    Args:
        level: Minimum level name.
        json_logs: Force JSON (True) or console (False) output; None picks JSON off a TTY.
    """
    if json_logs is None:
        json_logs = not sys.stderr.isatty()
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # The SDK appends the same details to every message as a dict's repr; as fields they can be
    # filtered on, and the message stays one line of text.
    temporalio.activity.logger.activity_info_on_message = False
    temporalio.workflow.logger.workflow_info_on_message = False
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if json_logs
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        # filter_by_level first: a call below the level costs one check, not the whole chain.
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, _temporal_fields],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2", "openai", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def loggable_url(url: str) -> str:
    """``url`` without what may be a credential (user, password, query, fragment), to show.

    Args:
        url: An endpoint from the environment, such as ``OPENAI_BASE_URL`` or ``REDIS_URL``.

    Returns:
        Scheme, host, port and path only (a Redis Cluster URL: its scheme and nodes).
    """
    # Imported here: the ``keel`` command loads this module, and most commands need no Redis.
    from keel.activities.redis_client import is_cluster_url, loggable_cluster_url

    if is_cluster_url(url):
        # A cluster's comma-separated node list is no URL authority httpx can parse.
        return loggable_cluster_url(url)
    return str(httpx.URL(url).copy_with(username=None, password=None, query=None, fragment=None))
