"""The ``search_docs`` tool: search the job's document folder and list the hits.

Not workflow code: reads the file system through the shared ``Retriever``. Hits read exactly as
a workflow's retrieval step shows them (``activities.types.format_hits``). The tool is
read-only but not in the tool-result cache: the Retriever's retrieval cache serves it, keyed by
the corpus's index version (``activities/catalog.py`` says why).
"""

from __future__ import annotations

from keel.activities.catalog import SearchDocsArgs
from keel.activities.retrieval import Retriever
from keel.activities.tools.base import ToolContext, invalid_input
from keel.activities.types import format_hits

__all__ = ["SearchDocs"]


class SearchDocs:
    """Search the job's document folder and list the hits, one per line."""

    def __init__(self, retriever: Retriever) -> None:
        self._retriever = retriever

    async def __call__(self, args: SearchDocsArgs, ctx: ToolContext) -> str:
        """Search the job's documents.

        Args:
            args: Query, top_k and metadata filters.
            ctx: The job's documents folder.

        Returns:
            The hits, as ``format_hits`` writes them.

        Raises:
            ApplicationError: ``TOOL_INPUT_INVALID`` if the job has no documents folder,
                ``DOCS_NOT_FOUND`` if the folder does not exist on this worker.
        """
        if not ctx.docs_dir:
            raise invalid_input("this job has no docs folder")
        # The Retriever's top-k cache serves this tool (it is keyed by the corpus's index
        # version, which only the Retriever knows), so the job's opt-out is passed on to it.
        hits = await self._retriever.search(
            ctx.docs_dir, args.query, args.top_k, args.filters, tenant=ctx.tenant, cache=ctx.cache
        )
        return format_hits(hits)
