"""``connect`` reads REDIS_URL: plain URLs keep redis-py's client, cluster URLs get RedisCluster.

What reaches a real server is tested in ``test_redis_cluster.py`` (a cluster) and here (the
suite's redis-server, a plain URL); this module pins how URLs are read and refused.
"""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import SSLConnection
from redis.exceptions import ConnectionError as RedisConnectionError

from keel.activities.redis_client import connect, is_cluster_url, parse_cluster_url
from keel.workers.logs import loggable_url
from tests.conftest import free_port


async def test_a_plain_url_keeps_redis_pys_client_and_its_pool(redis_url: str) -> None:
    client = connect(redis_url, socket_timeout=3, socket_connect_timeout=2, decode_responses=True)
    try:
        assert type(client) is aioredis.Redis
        kwargs = client.connection_pool.connection_kwargs
        assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (3, 2)
        assert (
            await client.set("keel:test:connect", "v")
            and await client.get("keel:test:connect") == "v"
        )
    finally:
        await client.aclose()
    # With a pool timeout (the API's), past max_connections a command waits for a connection.
    blocking = connect(redis_url, max_connections=2, pool_timeout=5)
    try:
        assert isinstance(blocking.connection_pool, aioredis.BlockingConnectionPool)
        assert blocking.connection_pool.max_connections == 2
    finally:
        await blocking.aclose()


def test_a_cluster_url_names_its_nodes_tls_and_options() -> None:
    url = "rediss+cluster://app:s%40cret@10.0.0.1:7000,node-b,[::1]:7002/0?ssl_cert_reqs=none"
    parsed = parse_cluster_url(url)
    assert parsed.nodes == (("10.0.0.1", 7000), ("node-b", 6379), ("::1", 7002))
    assert parsed.tls
    assert parsed.options == {"username": "app", "password": "s@cret", "ssl_cert_reqs": "none"}
    assert is_cluster_url(url) and is_cluster_url("REDIS+CLUSTER://h:1")
    assert not is_cluster_url("redis://h:1/0") and not is_cluster_url("unix:///tmp/r.sock")
    assert not parse_cluster_url("redis+cluster://h:7000?health_check_interval=5").tls

    client = connect(url, socket_timeout=2, decode_responses=True, max_connections=7)
    assert isinstance(client, RedisCluster)
    nodes = client.nodes_manager.startup_nodes
    assert sorted(nodes) == ["10.0.0.1:7000", "::1:7002", "node-b:6379"]
    for node in nodes.values():
        assert node.connection_class is SSLConnection and node.max_connections == 7
        assert node.connection_kwargs["password"] == "s@cret"
        assert node.connection_kwargs["socket_timeout"] == 2
        assert node.connection_kwargs["ssl_cert_reqs"] == "none"
    # Only the scheme and the nodes are shown: no user, password or options.
    assert loggable_url(url) == "rediss+cluster://10.0.0.1:7000,node-b:6379,[::1]:7002"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+cluster://", "names no node"),
        ("redis+cluster://user:pw@/0", "names no node"),
        ("redis+cluster://a:7000,,b:7001", "empty entry"),
        ("redis+cluster://a:7000,", "empty entry"),
        ("redis+cluster://a:port", "'a:port': the port must be a number"),
        ("redis+cluster://a:70000", "the port must be a number from 1 to 65535"),
        ("redis+cluster://a:0", "the port must be a number from 1 to 65535"),
        ("redis+cluster://:7000", "is not host:port"),
        ("redis+cluster://a:7000/3", "only database 0"),
        ("redis+cluster://a:7000/zero", "only database 0"),
        ("redis+cluster://a:7000?db=2", "database other than 0"),
        ("redis+cluster://a:7000?health_check_interval=soon", "health_check_interval"),
        ("redis+cluster://a:7000?socket_tmeout=1", "option redis-py does not take"),
    ],
)
def test_a_malformed_cluster_url_is_refused_naming_the_problem(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        connect(url)


def test_an_unknown_scheme_is_refused() -> None:
    for url in ("http://127.0.0.1:6379", "redis+sentinel://a:7000"):
        with pytest.raises(ValueError, match="redis://, rediss://, unix://"):
            connect(url)
    with pytest.raises(ValueError, match="not a Redis Cluster URL"):
        parse_cluster_url("redis://a:7000/0")


async def test_an_unreachable_cluster_is_a_redis_connection_error() -> None:
    # Keel's limits, caches and breakers let work through on a RedisError, and activities
    # retry a Redis ConnectionError; redis-py's own "cannot be connected" is neither.
    client = connect(
        f"redis+cluster://127.0.0.1:{free_port()}", socket_timeout=1, socket_connect_timeout=1
    )
    try:
        with pytest.raises(RedisConnectionError, match="Redis Cluster unreachable"):
            await client.ping()
    finally:
        await client.aclose()
