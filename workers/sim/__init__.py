"""The OpenAI-compatible LLM simulator that ``keel sim-llm`` serves.

``app`` holds the HTTP surface (``create_app``, ``serve``), ``config`` its ``SimConfig``,
``state`` the per-app counters, faults and latency, ``truth`` the per-job ground truth, and
``directives``, ``replies``, ``quality`` (who drafts right, who catches a wrong draft, where to
route) and ``wire`` the pure, deterministic logic behind each reply.
"""

from keel.workers.sim.app import create_app, serve
from keel.workers.sim.config import FaultKind, SimConfig

__all__ = ["FaultKind", "SimConfig", "create_app", "serve"]
