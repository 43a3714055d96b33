"""A throwaway PostgreSQL server for tests: its own cluster in a temp folder, on a free port."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def postgres_available() -> bool:
    return _bin("initdb") is not None and _bin("pg_ctl") is not None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """initdb + pg_ctl on loopback; as root they run through ``runuser -u postgres``."""

    def __init__(self, *, max_connections: int = 200) -> None:
        """Args:
            max_connections: The server's connection limit; a benchmark of hundreds of workers
                (each with its own connections) raises it.
        """
        self.max_connections = max_connections
        self.folder = Path(tempfile.mkdtemp(prefix="autofinetune-pg-"))
        self.data = self.folder / "data"
        self.port = _free_port()
        self._as_root = os.geteuid() == 0

    def _run(self, *args: str) -> None:
        command = list(args)
        if self._as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def start(self) -> "PostgresServer":
        if self._as_root:
            shutil.chown(self.folder, "postgres", "postgres")
        self._run(_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self.resume()
        return self

    def _options(self) -> str:
        return f"-h 127.0.0.1 -p {self.port} -k {self.folder} -c fsync=off -c max_connections={self.max_connections}"

    def restart(self) -> None:
        """A fast restart, as an operator does (clients' connections are closed; about a second down)."""
        self._run(
            _bin("pg_ctl"), "-D", str(self.data), "-l", str(self.data / "server.log"), "-m", "fast", "-w", "-t", "60",
            "-o", self._options(), "restart",
        )

    def pause(self) -> None:
        """Stop the server (fast shutdown) and keep its data, until :meth:`resume`."""
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def resume(self) -> None:
        """Start the server (again) on its port and data."""
        self._run(
            _bin("pg_ctl"), "-D", str(self.data), "-l", str(self.data / "server.log"), "-w", "-t", "60",
            "-o", self._options(), "start",
        )

    def create_database(self, name: str) -> str:
        """Create a database and return its SQLAlchemy URL."""
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def url(self, database: str, password: str | None = None) -> str:
        auth = f"postgres:{password}" if password else "postgres"
        return f"postgresql+psycopg://{auth}@127.0.0.1:{self.port}/{database}"

    def dump(self, database: str) -> str:
        """All rows of every table, as text (to search for leaked secrets)."""
        import psycopg

        parts = []
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname={database}") as conn:
            tables = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
            for table in tables:
                for row in conn.execute(f'SELECT * FROM "{table}"'):
                    parts.append(repr(row))
        return "\n".join(parts)

    def stop(self) -> None:
        try:
            self._run(_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.folder, ignore_errors=True)
