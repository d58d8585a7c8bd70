"""Named document corpora: which folders on the worker a tenant's jobs may search.

A job names a corpus (``corpus:handbook``), never a path: the worker maps the name to a folder
from its configuration, first among the tenant's own corpora, then among the shared ones
(scope ``*``). Another tenant's corpus is "not found", like one that does not exist. The
configuration is ``KEEL_CORPORA``, JSON ``{"*": {"keel-docs": "/srv/docs"}, "acme":
{"handbook": "/srv/acme"}}``, read by workers (to resolve) and by clients and the API (to refuse
an unknown corpus at submit). Deterministic and I/O-free.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

__all__ = ["CORPORA_ENV", "CORPUS_PREFIX", "SHARED", "Corpora", "corpus_name", "valid_name"]

CORPUS_PREFIX = "corpus:"
"""A job's document reference that names a corpus rather than a folder."""
SHARED = "*"
"""The scope of corpora every tenant may search."""
CORPORA_ENV = "KEEL_CORPORA"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
"""Corpus names: the same character set as tenant names."""


def corpus_name(docs_ref: str | None) -> str | None:
    """The corpus a job's document reference names, or None for a folder path (or nothing)."""
    if docs_ref and docs_ref.startswith(CORPUS_PREFIX):
        return docs_ref[len(CORPUS_PREFIX) :]
    return None


def valid_name(name: str) -> bool:
    """Whether ``name`` can name a corpus."""
    return bool(_NAME.match(name))


class Corpora:
    """Corpus names to folders, per tenant and shared."""

    def __init__(self, by_scope: Mapping[str, Mapping[str, str]] | None = None) -> None:
        self._by_scope = {scope: dict(names) for scope, names in (by_scope or {}).items()}
        for scope, names in self._by_scope.items():
            for name, path in names.items():
                if not _NAME.match(name) or not isinstance(path, str) or not path:
                    raise ValueError(
                        f"{CORPORA_ENV}: corpus {scope}/{name!r} needs a name and a path"
                    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Corpora:
        """From ``KEEL_CORPORA`` (empty when unset).

        Raises:
            ValueError: If it is not a JSON object of scopes to objects of names to paths.
        """
        text = (os.environ if environ is None else environ).get(CORPORA_ENV, "").strip()
        if not text:
            return cls()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{CORPORA_ENV} is not JSON: {err}") from None
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise ValueError(f"{CORPORA_ENV} must map scopes to {{name: path}} objects")
        return cls(data)

    @property
    def configured(self) -> bool:
        """Whether any corpus is configured (else submit-time checks are left to workers)."""
        return any(self._by_scope.values())

    def resolve(self, tenant: str, name: str) -> str | None:
        """The folder ``tenant``'s jobs search for ``name``: its own corpus, else a shared one."""
        return self._by_scope.get(tenant, {}).get(name) or self._by_scope.get(SHARED, {}).get(name)

    def visible(self, tenant: str) -> list[str]:
        """The corpus names ``tenant`` may use."""
        return sorted(set(self._by_scope.get(tenant, {})) | set(self._by_scope.get(SHARED, {})))
