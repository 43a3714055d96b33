"""The study database as a server shared by many workers: bounded pools, patient connections."""

from __future__ import annotations

import threading
import time

import pytest

from autofinetune.errors import ConfigError
from autofinetune.store.database import connect_with_retry, open_storage, POOL_MAX_OVERFLOW, POOL_SIZE


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


CLAIM_AND_HOLD = """
import sys, time
from autofinetune.store.database import claim_lock, open_storage
storage = open_storage(sys.argv[1], create=False)
with claim_lock(sys.argv[1], storage=storage, study_name="s"):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.mark.slow
def test_workers_on_postgresql_claim_one_at_a_time_and_a_dead_workers_claim_is_released(postgres_server):
    import subprocess
    import sys

    from autofinetune.store.database import claim_lock

    url = postgres_server.create_database("claims")
    first, second = open_storage(url), open_storage(url, create=False)
    entered, left = threading.Event(), []

    def claim_slowly() -> None:
        with claim_lock(url, storage=first, study_name="s"):
            entered.set()
            time.sleep(1.0)
            left.append(time.monotonic())

    holder = threading.Thread(target=claim_slowly)
    holder.start()
    assert entered.wait(30)
    with claim_lock(url, storage=second, study_name="another study"):
        assert not left, "workers of another study do not wait"
    with claim_lock(url, storage=second, study_name="s"):
        got_it = time.monotonic()
    holder.join()
    assert left and got_it >= left[0], "the second worker claimed while the first still held the lock"

    # A worker killed while claiming: the server drops its connection and with it the lock.
    process = subprocess.Popen([sys.executable, "-c", CLAIM_AND_HOLD, url], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "held"
        process.kill()
        process.wait(30)
        done = threading.Event()

        def claim_after_kill() -> None:
            with claim_lock(url, storage=second, study_name="s"):
                done.set()

        threading.Thread(target=claim_after_kill, daemon=True).start()
        assert done.wait(30), "the dead worker's claim lock was never released"
    finally:
        process.kill()
