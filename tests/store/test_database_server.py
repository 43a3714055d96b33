"""The study database as a server shared by many workers: bounded pools, patient connections."""

from __future__ import annotations

import threading
import time

import pytest

from autofinetune.errors import ConfigError
from autofinetune.store.database import POOL_MAX_OVERFLOW, POOL_SIZE, connect_with_retry, open_storage


def test_connect_with_retry_waits_out_a_full_server_but_not_a_wrong_address():
    calls = []

    def full_twice():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError('FATAL:  sorry, too many clients already')
        return "connection"

    assert connect_with_retry(full_twice, retry_seconds=10, first_wait=0.01) == "connection"
    assert len(calls) == 3

    refused = []

    def wrong_port():
        refused.append(1)
        raise RuntimeError("connection failed: Connection refused")

    with pytest.raises(RuntimeError, match="Connection refused"):
        connect_with_retry(wrong_port, retry_seconds=10, first_wait=0.01)
    assert len(refused) == 1, "a refused connection is not retried"


@pytest.fixture
def full_server():
    """A PostgreSQL server of 5 connections, all of them taken."""
    import psycopg
    from postgres import PostgresServer, postgres_available

    if not postgres_available():
        pytest.skip("PostgreSQL is not installed")
    server = PostgresServer(max_connections=5).start()
    url = server.create_database("full")
    held = [psycopg.connect(f"host=127.0.0.1 port={server.port} user=postgres dbname=postgres") for _ in range(5)]
    yield url, held
    for connection in held:
        connection.close()
    server.stop()


@pytest.mark.slow
def test_a_worker_starting_on_a_full_server_waits_for_a_free_slot(full_server):
    url, held = full_server
    with pytest.raises(ConfigError, match="too many clients"):
        open_storage(url, connect_retry_seconds=0)

    # Optuna's storage opens two connections at once while it checks the schema version.
    freed = [held.pop(), held.pop()]
    releaser = threading.Timer(1.0, lambda: [connection.close() for connection in freed])
    releaser.start()
    storage = open_storage(url, connect_retry_seconds=60)
    releaser.join()
    assert storage.get_all_studies() == []
    # A small pool per worker: its main thread and heartbeat thread, not SQLAlchemy's 5 + 10.
    assert storage.engine.pool.size() == POOL_SIZE
    assert storage.engine.pool._max_overflow == POOL_MAX_OVERFLOW
