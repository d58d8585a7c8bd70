"""The tool gateway (the ``execute_tool`` activity) and the built-in tools.

Owns everything between a planned tool call and its effect, one concern per module:

* ``gateway``: the ``execute_tool`` activity: the job's allow-list, argument validation against
  ``activities/catalog.py``, exactly-once recording of side-effecting calls, and moving large
  outputs to a Redis blob so only a preview enters workflow history.
* ``result_cache``: the tool-result cache's keys and entries: read-only tools' outputs, served
  again to the same tenant for the same tool version, arguments and scope (issue 14).
* ``registry``: the tools a worker offers and the resources they share.
* ``base``: what every tool receives (``ToolContext``) and how it fails.
* ``calculator``, ``http_get``, ``notes`` (``write_note``), ``search_docs``: the built-in tools.

Failures are raised as ``ApplicationError`` with a type from ``activities/errors.py`` and honest
retry semantics. Not workflow code: tools perform network and Redis I/O.
"""

from keel.activities.tools.base import ToolContext, ToolImpl
from keel.activities.tools.calculator import evaluate_expression
from keel.activities.tools.gateway import ToolActivities
from keel.activities.tools.registry import ToolRegistry

__all__ = ["ToolActivities", "ToolContext", "ToolImpl", "ToolRegistry", "evaluate_expression"]
