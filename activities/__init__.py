"""Activities: every side effect of a Keel job (LLM, tools, retrieval, storage)."""
