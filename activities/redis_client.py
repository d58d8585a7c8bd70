"""Keel's Redis clients, built from one URL: a single server or a Redis Cluster.

Every component that reads ``REDIS_URL`` (the worker's stores, limits, caches and breakers,
the HTTP API, the CLI) builds its client with :func:`connect`, so one URL decides for the
whole process whether Keel talks to one Redis or to a cluster. Keel's multi-key operations
already keep each operation's keys in one hash slot (``{tenant}`` and ``{name}`` hash tags),
which is what lets the same code run on either client.

On a cluster: pipelines are non-transactional (Keel sends no MULTI), ``scan_iter`` visits
every primary, an unreachable cluster is a ``redis.exceptions.ConnectionError`` as an
unreachable server is (see ``_KeelCluster``), and there is no blocking connection pool.

The module lives in ``keel.activities`` (the lowest layer) so that ``keel.client`` and
``keel.workers`` may import it too; it imports nothing but redis-py.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from typing import Any, TypeAlias

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException

KeelRedis: TypeAlias = aioredis.Redis | RedisCluster
"""A client :func:`connect` returns: one server's, or a cluster's."""

CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}
"""The URL schemes that name a cluster, and whether each speaks TLS."""

DEFAULT_PORT = 6379


@dataclass(frozen=True)
class ClusterURL:
    """What a ``redis+cluster://`` URL says.

    Attributes:
        nodes: The startup nodes, ``(host, port)``; the client learns the rest from them.
        tls: True for ``rediss+cluster://``.
        options: Connection keywords from the URL's user, password and query string, as
            redis-py parses them for a plain URL (``ssl_cert_reqs``, ``health_check_interval``).
    """

    nodes: tuple[tuple[str, int], ...]
    tls: bool
    options: dict[str, Any]


def loggable_cluster_url(url: str) -> str:
    """A cluster URL's scheme and nodes only, to show (no user, password or options).

    Args:
        url: A ``redis+cluster://`` or ``rediss+cluster://`` URL.

    Returns:
        ``scheme://host:port,...``, or the scheme and ``<malformed>`` if it does not parse.
    """
    scheme = url.partition("://")[0]
    try:
        nodes = parse_cluster_url(url).nodes
    except ValueError:
        return f"{scheme}://<malformed>"
    return f"{scheme}://" + ",".join(
        f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host, port in nodes
    )


def is_cluster_url(url: str) -> bool:
    """True when ``url``'s scheme names a Redis Cluster (``redis+cluster``, ``rediss+cluster``)."""
    return url.partition("://")[0].lower() in CLUSTER_SCHEMES


def parse_cluster_url(url: str) -> ClusterURL:
    """Parse a cluster URL (see :func:`connect` for its spelling).

    Args:
        url: A ``redis+cluster://`` or ``rediss+cluster://`` URL.

    Returns:
        Its startup nodes, whether it uses TLS, and its connection options.

    Raises:
        ValueError: The URL is not a cluster URL, names no node, names a node without a
            host or with a port that is not a number from 1 to 65535, names a database other
            than 0 (a cluster has only database 0), or has an option value redis-py cannot
            read.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in CLUSTER_SCHEMES:
        raise ValueError(
            f"not a Redis Cluster URL: the scheme must be one of {sorted(CLUSTER_SCHEMES)}"
        )
    tls = CLUSTER_SCHEMES[scheme.lower()]
    # The node list may hold commas, which urllib's netloc parsing cannot take as a port, so
    # the authority is split here and each node is parsed on its own.
    authority, _, tail = rest.partition("/")
    authority, _, query = authority.partition("?")
    path, _, query = (tail, "", query) if query else tail.partition("?")
    # redis-py ignores a database that is not a number; a cluster has only 0, so say so.
    if path not in ("", "0"):
        raise ValueError(f"Redis Cluster URL path {'/' + path!r}: a cluster has only database 0")
    tail = f"?{query}" if query else ""
    userinfo, at, hosts = authority.rpartition("@")
    if not hosts.strip():
        raise ValueError("Redis Cluster URL names no node: expected host:port[,host:port...]")
    nodes = tuple(_node(entry) for entry in hosts.split(","))
    # The user, password, database and query string mean what they mean in a plain URL, so
    # redis-py's own parser reads them (unquoting, casting the query's values); the host it
    # sees is a placeholder, dropped below, since the nodes were read above.
    plain = f"{'rediss' if tls else 'redis'}://{userinfo}{at}cluster{tail}"
    try:
        options: dict[str, Any] = dict(parse_url(plain))
    except ValueError as err:
        raise ValueError(f"Redis Cluster URL: {err}") from err
    if str(options.pop("db", 0)) != "0":
        raise ValueError("Redis Cluster URL names a database other than 0; a cluster has only 0")
    for key in ("host", "port", "connection_class", "path"):
        options.pop(key, None)
    return ClusterURL(nodes=nodes, tls=tls, options=options)


def _node(entry: str) -> tuple[str, int]:
    """One ``host:port`` of a cluster URL's node list (``[v6]:port`` for IPv6)."""
    entry = entry.strip()
    if not entry:
        raise ValueError("Redis Cluster URL has an empty entry in its node list (a stray comma)")
    bad_port = f"Redis Cluster URL node {entry!r}: the port must be a number from 1 to 65535"
    try:
        parts = urllib.parse.urlsplit(f"//{entry}")
        host, port = parts.hostname, parts.port
    except ValueError as err:
        raise ValueError(bad_port) from err
    if not host or parts.path or parts.query or parts.username is not None:
        raise ValueError(f"Redis Cluster URL node {entry!r} is not host:port")
    if port == 0:
        raise ValueError(bad_port)
    return host, port or DEFAULT_PORT


class _KeelCluster(RedisCluster):
    """redis-py's cluster client, whose "cannot reach the cluster" is a ``ConnectionError``.

    redis-py raises ``RedisClusterException`` (which is not a ``RedisError``) when no startup
    node answers or the slots are not all covered, while a single server's client raises
    ``redis.exceptions.ConnectionError``. Keel's limits, caches and breakers let work through
    when Redis is unreachable by catching ``RedisError``, and activities classify a Redis
    ``ConnectionError`` as retryable (``activities/errors.py``), so an unreachable cluster is
    reported as one too. Other ``RedisClusterException`` (keys of two slots in one command, a
    programming error) stay as they are.
    """

    async def initialize(
        self,
        additional_startup_nodes_info: list[tuple[str, int]] | None = None,
        last_failed_node_name: str | None = None,
    ) -> RedisCluster:
        try:
            return await super().initialize(
                additional_startup_nodes_info=additional_startup_nodes_info,
                last_failed_node_name=last_failed_node_name,
            )
        except RedisClusterException as err:
            raise RedisConnectionError(f"Redis Cluster unreachable: {err}") from err


def connect(
    url: str,
    *,
    socket_timeout: float | None = None,
    socket_connect_timeout: float | None = None,
    decode_responses: bool = False,
    max_connections: int | None = None,
    pool_timeout: float | None = None,
) -> KeelRedis:
    """Build a Redis client from ``url``: a single server's, or a Redis Cluster's.

    A single server keeps redis-py's own URLs and client (``redis.asyncio.Redis.from_url``):
    ``redis://[[user]:password@]host[:port][/db][?option=value...]``, ``rediss://`` for TLS
    and ``unix://[[user]:password@]/path/to/socket[?db=N]``.

    A cluster is named by its own scheme and any of its nodes, comma-separated:
    ``redis+cluster://[[user]:password@]host:port[,host:port...][/0][?option=value...]``,
    or ``rediss+cluster://`` for TLS. The client (redis-py's ``RedisCluster``) asks the
    first node that answers for the slot map and follows it, so one node is enough and more
    only help when some are down. A port left out is 6379; an IPv6 host is written
    ``[::1]:7000``; the database, if given, must be 0; the user, password and query options
    mean what they mean in a plain URL (``?ssl_cert_reqs=none``).

    Args:
        url: The ``REDIS_URL``.
        socket_timeout: The longest wait for any reply, in seconds (None: no limit).
        socket_connect_timeout: The longest wait to connect, in seconds (None: no limit).
        decode_responses: Return ``str`` rather than ``bytes``.
        max_connections: Connections the client opens at most (a cluster: per node);
            None keeps redis-py's default.
        pool_timeout: A single server only: when set, the client uses a blocking pool, so
            past ``max_connections`` a command waits up to this many seconds for a
            connection instead of failing. redis-py's cluster client has no blocking pool:
            past ``max_connections`` on a node it raises ``MaxConnectionsError`` (a
            ``redis.exceptions.ConnectionError``).

    Returns:
        A ``redis.asyncio.Redis`` for a plain URL, a ``RedisCluster`` for a cluster URL; close
        it with ``aclose``.

    Raises:
        ValueError: The URL is malformed; the message says what is wrong with it (for a
            plain URL, redis-py's message, such as an unknown scheme).
    """
    options: dict[str, Any] = {"decode_responses": decode_responses}
    if socket_timeout is not None:
        options["socket_timeout"] = socket_timeout
    if socket_connect_timeout is not None:
        options["socket_connect_timeout"] = socket_connect_timeout
    if max_connections is not None:
        options["max_connections"] = max_connections
    if not is_cluster_url(url):
        if pool_timeout is None:
            return aioredis.Redis.from_url(url, **options)
        pool = aioredis.BlockingConnectionPool.from_url(url, timeout=pool_timeout, **options)
        return aioredis.Redis(connection_pool=pool)
    cluster = parse_cluster_url(url)
    kwargs = cluster.options | options
    if cluster.tls:
        kwargs["ssl"] = True
    nodes = [ClusterNode(host, port) for host, port in cluster.nodes]
    try:
        return _KeelCluster(startup_nodes=nodes, **kwargs)
    except TypeError as err:
        # An option of the query string that no connection takes (a typo, as a single
        # server's client would find only when it first connects).
        raise ValueError(f"Redis Cluster URL has an option redis-py does not take: {err}") from err


__all__ = [
    "CLUSTER_SCHEMES",
    "ClusterURL",
    "KeelRedis",
    "connect",
    "is_cluster_url",
    "loggable_cluster_url",
    "parse_cluster_url",
]
