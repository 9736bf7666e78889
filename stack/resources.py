"""The private resources a stack runs on: free ports, a RabbitMQ vhost and a PostgreSQL database
of its own on the machine's servers, and `manage.py` run in the stack's environment."""

import ctypes
import os
import signal
import socket
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
RABBIT_ENV = {"ERL_EPMD_ADDRESS": "127.0.0.1"}


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def die_with_parent():
    """preexec_fn: the child gets SIGKILL when the process that started it dies, however it dies."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def manage(env, *args, timeout=300):
    """`manage.py ARGS` in `env`; its stdout, or RuntimeError with its stderr."""
    result = subprocess.run([str(BIN / "python"), "manage.py", *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"manage.py {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result.stdout


def rabbitmqctl(*args, check=True):
    result = subprocess.run(["rabbitmqctl", *args], env={**os.environ, **RABBIT_ENV}, capture_output=True, text=True,
                            timeout=60)
    if check and result.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {result.stderr.strip()[-2000:]}")
    return result


class Vhost:
    """A vhost of the stack's own on the local RabbitMQ, so no other worker eats its messages."""

    def __init__(self, name):
        self.name = name
        self.url = f"amqp://guest:guest@127.0.0.1:5672/{name}"

    def create(self):
        rabbitmqctl("add_vhost", self.name, check=False)  # already there: fine
        rabbitmqctl("set_permissions", "-p", self.name, "guest", ".*", ".*", ".*")
        return self

    def delete(self):
        rabbitmqctl("delete_vhost", self.name, check=False)


class Database:
    """A database of the stack's own on some PostgreSQL server: migrated (or cloned from a
    migrated one), dropped afterwards."""

    def __init__(self, name, port=5432, host="127.0.0.1"):
        self.name, self.port, self.host = name, port, host
        self.url = f"postgres://postgres@{host}:{port}/{name}"

    def _connect(self, dbname="postgres", **kwargs):
        import psycopg

        return psycopg.connect(host=self.host, port=self.port, user="postgres", dbname=dbname, connect_timeout=10,
                               **kwargs)

    def create(self, env):
        """Drop any leftover of the same name, then create and migrate it with `env`'s settings."""
        self.drop()
        env = {**env, "DATABASE_URL": self.url}
        manage(env, "ensure_database")
        manage(env, "migrate", "--no-input", "-v", "0")
        return self

    def clone(self, template):
        """A copy of an already migrated database (CREATE DATABASE ... TEMPLATE): seconds faster."""
        self.drop()
        with self._connect(autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}" TEMPLATE "{template}"')
        return self

    def drop(self):
        with self._connect(autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')

    def query(self, sql, params=()):
        with self._connect(self.name) as conn:
            return conn.execute(sql, params).fetchall()
