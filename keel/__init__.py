"""Keel: durable AI-agent jobs on Temporal.

The four folders at the repository root install and import as one package: ``keel.client``
(what callers import), ``keel.workflows`` (deterministic orchestration), ``keel.activities``
(every side effect) and ``keel.workers`` (the worker process and the commands that start
processes). In a checkout, ``keel/`` holds links to those folders; a built wheel holds the
files themselves under ``keel/``.
"""
