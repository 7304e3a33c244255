"""Settings of the Elasticsearch backend, and its client failures as one-line errors.

:class:`ElasticsearchConfig` is shared by the CLI flags (``--es-*``) and by code that picks a
backend from a config object (the server). :func:`es_errors` turns every client or server
failure into a :class:`~prag_vllm.errors.RetrievalError` naming the URL and the index.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prag_vllm.errors import InputError, RetrievalError

logger = logging.getLogger(__name__)

ANALYZERS = ("prag_english", "english")
_BAD_INDEX_CHARS = set('\\/*?"<>| ,#:')


@dataclass
class ElasticsearchConfig:
    """Where the Elasticsearch index lives and how to talk to it (shared by CLI and server)."""

    url: str = "http://localhost:9200"
    """Cluster URL, ``http://`` or ``https://`` (a load balancer or any node)."""
    index: str = "prag-corpus"
    """Index name (lower-case, Elasticsearch's naming rules)."""
    api_key: str | None = None
    """API key (the base64 ``id:key`` form Elasticsearch prints), or None."""
    basic_auth: tuple[str, str] | None = None
    """(user, password) for basic authentication, or None. Not together with ``api_key``."""
    ca_certs: str | None = None
    """PEM file of the CA that signed the cluster's certificate (https only)."""
    verify_certs: bool = True
    """Verify the server certificate (https only); False is for throw-away test clusters."""
    request_timeout: float = 30.0
    """Seconds per request before it is retried or fails."""
    max_retries: int = 3
    """Retries of a request on connection errors, timeouts and 429/502/503/504."""
    bulk_batch_size: int = 500
    """Documents per bulk request when indexing."""
    search_batch_size: int = 64
    """Queries per ``_msearch`` request."""
    analyzer: str = "prag_english"
    """``prag_english`` (matches the embedded bm25s analyzer) or the built-in ``english``."""
    shards: int = 1
    """Primary shards of a newly created index (more for corpora of many millions)."""
    replicas: int | None = None
    """Replicas of a newly created index; None keeps the cluster default."""
    extra_client_kwargs: dict = field(default_factory=dict)
    """Anything else passed as is to ``elasticsearch.Elasticsearch`` (e.g. ``client_cert``)."""

    def __post_init__(self) -> None:
        if not re.match(r"^https?://[^/\s]+", self.url or ""):
            raise InputError(f"Elasticsearch URL must start with http:// or https://, got {self.url!r}")
        name = self.index or ""
        if (not name or name != name.lower() or name in (".", "..") or name[0] in "-_+"
                or any(c in _BAD_INDEX_CHARS for c in name) or len(name.encode()) > 255):
            raise InputError(f"invalid Elasticsearch index name {name!r} (lower-case, no spaces or \\/*?\"<>|,#:)")
        if self.api_key and self.basic_auth:
            raise InputError("give either an Elasticsearch API key or a user and password, not both")
        if self.basic_auth is not None and (len(self.basic_auth) != 2 or not self.basic_auth[0]):
            raise InputError("Elasticsearch basic auth needs a user name and a password")
        if self.ca_certs is not None and not Path(self.ca_certs).is_file():
            raise InputError(f"Elasticsearch CA certificate file not found: {self.ca_certs}")
        if self.analyzer not in ANALYZERS:
            raise InputError(f"Elasticsearch analyzer must be one of {ANALYZERS}, got {self.analyzer!r}")
        if (self.request_timeout <= 0 or self.max_retries < 0 or self.bulk_batch_size <= 0 or self.shards <= 0
                or self.search_batch_size <= 0):
            raise InputError("Elasticsearch timeout, batch size and shards must be positive, retries >= 0")

    @property
    def where(self) -> str:
        """``index 'x' at URL``, for messages (never includes credentials)."""
        return f"index {self.index!r} at {self.url}"

    def client_kwargs(self) -> dict:
        """Keyword arguments for ``elasticsearch.Elasticsearch`` (auth and TLS passed through)."""
        kw: dict = {
            "hosts": [self.url],
            "request_timeout": self.request_timeout,
            "max_retries": self.max_retries,
            "retry_on_timeout": True,
            "retry_on_status": (429, 502, 503, 504),
        }
        if self.api_key:
            kw["api_key"] = self.api_key
        if self.basic_auth:
            kw["basic_auth"] = tuple(self.basic_auth)
        if self.url.startswith("https://"):
            kw["verify_certs"] = self.verify_certs
            if self.ca_certs:
                kw["ca_certs"] = self.ca_certs
            if not self.verify_certs:
                kw["ssl_show_warn"] = False
        kw.update(self.extra_client_kwargs)
        return kw

    def make_client(self):
        try:
            from elasticsearch import Elasticsearch
        except ImportError:
            raise RetrievalError("the Elasticsearch backend needs the `elasticsearch` package: "
                                 "pip install 'prag-vllm[es]'") from None
        return Elasticsearch(**self.client_kwargs())



def one_line(text: object, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _connection_reason(exc: Exception) -> str:
    text = str(exc)
    m = re.search(r"\[SSL: [A-Z_]+\][^()]*", text)
    if m:
        hint = " (give the cluster's CA with --es-ca-certs)" if "CERTIFICATE_VERIFY_FAILED" in m.group(0) else ""
        return one_line(f"TLS error {m.group(0).strip()}{hint}", 250)
    m = re.search(r"\[Errno -?\d+\][^)>\]'\"]*", text)
    return one_line(m.group(0).strip() if m else f"{type(exc).__name__}: {text}", 200)


@contextlib.contextmanager
def es_errors(cfg: ElasticsearchConfig, action: str) -> Iterator[None]:
    """Turn client/server failures into one-line :class:`RetrievalError` naming URL and index."""
    try:
        yield
    except RetrievalError:
        raise
    except Exception as exc:  # noqa: BLE001 -- only elasticsearch/elastic_transport errors are translated
        import elastic_transport
        import elasticsearch

        if isinstance(exc, elasticsearch.AuthenticationException):
            msg = f"Elasticsearch at {cfg.url} rejected the credentials (401) while trying to {action}"
        elif isinstance(exc, elasticsearch.AuthorizationException):
            msg = f"Elasticsearch at {cfg.url} does not allow these credentials to {action} {cfg.where} (403)"
        elif isinstance(exc, elasticsearch.NotFoundError) and "index_not_found" in str(exc.error):
            msg = (f"Elasticsearch index {cfg.index!r} not found at {cfg.url} "
                   f"(run `prag index --retriever elasticsearch` first)")
        elif isinstance(exc, elasticsearch.UnsupportedProductError):
            msg = f"the server at {cfg.url} is not Elasticsearch ({one_line(exc, 150)})"
        elif isinstance(exc, elasticsearch.ApiError) and "media_type_header" in str(exc.error):
            from elasticsearch import __versionstr__

            msg = (f"Elasticsearch at {cfg.url} refused client {__versionstr__}'s API version: install the client "
                   f"major version of the cluster, e.g. pip install 'elasticsearch>=8,<9' for an 8.x cluster")
        elif isinstance(exc, elasticsearch.ApiError):
            msg = (f"Elasticsearch failed to {action} {cfg.where}: {exc.meta.status} {exc.error}: "
                   f"{one_line(exc.message, 200)}")
        elif isinstance(exc, elastic_transport.ConnectionTimeout):
            msg = (f"Elasticsearch at {cfg.url} did not answer within {cfg.request_timeout:g} s "
                   f"(index {cfg.index!r}, {action}); raise --es-timeout or check the cluster")
        elif isinstance(exc, elastic_transport.ConnectionError):
            msg = f"cannot reach Elasticsearch at {cfg.url} (index {cfg.index!r}): {_connection_reason(exc)}"
        elif isinstance(exc, elastic_transport.TransportError):
            msg = f"Elasticsearch transport error at {cfg.url} while trying to {action}: {one_line(exc, 200)}"
        else:
            raise
        raise RetrievalError(msg) from exc
