"""The job commands of the ``keel`` command line, as a list the composition root mounts.

``keel.workers.cli`` builds the ``keel`` app: it mounts ``COMMANDS`` (submit, chat, status,
watch, result, answer, cancel, list, fleet) beside the commands that start processes. Nothing
here builds or mutates an app of its own.
"""

from keel.client.cli.commands import COMMANDS

__all__ = ["COMMANDS"]
