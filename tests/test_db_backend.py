"""The database backend's health check (face_detect_api/postgresql/base.py): it looks at the
socket instead of sending `SELECT 1`, and must still drop every connection PostgreSQL ended."""

import time

import psycopg
import pytest
from django.db import connection

from face_detect_api.postgresql.base import idle_and_quiet

pytestmark = pytest.mark.django_db(transaction=True)


def _kept_connection():
    """The Django connection, open, idle and with health checks on, as a request finds it."""
    connection.ensure_connection()
    connection.health_check_enabled = True
    connection.health_check_done = False
    return connection.connection


def _terminate(pid):
    params = connection.get_connection_params()
    with psycopg.connect(**{**params, "dbname": "postgres"}, autocommit=True) as other:
        other.execute("SELECT pg_terminate_backend(%s)", [pid])


def test_an_idle_open_connection_is_kept_without_a_query(monkeypatch):
    raw = _kept_connection()
    monkeypatch.setattr(connection, "is_usable", lambda: pytest.fail("no SELECT 1 expected"))
    connection.close_if_health_check_failed()
    assert connection.connection is raw
    assert connection.health_check_done


def test_a_connection_the_server_ended_is_dropped_and_the_next_query_reconnects():
    raw = _kept_connection()
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    _terminate(pid)
    deadline = time.monotonic() + 10
    while idle_and_quiet(raw) and time.monotonic() < deadline:
        time.sleep(0.01)  # the FATAL message and the close travel over the socket
    assert not idle_and_quiet(raw)

    connection.health_check_done = False  # as at the start of the next request
    connection.close_if_health_check_failed()
    assert connection.connection is None
    with connection.cursor() as cursor:  # what the request's first query does: reconnect
        cursor.execute("SELECT pg_backend_pid()")
        assert cursor.fetchone()[0] != pid


def test_a_connection_inside_a_transaction_or_closed_is_not_quiet():
    raw = _kept_connection()
    raw.execute("BEGIN")
    try:
        assert not idle_and_quiet(raw)
    finally:
        raw.execute("ROLLBACK")
    assert idle_and_quiet(raw)
    connection.close()
    assert not idle_and_quiet(raw)


def test_a_connection_inside_a_transaction_gets_djangos_own_check_and_is_kept(monkeypatch):
    raw = _kept_connection()
    raw.execute("BEGIN")
    checked = []
    monkeypatch.setattr(connection, "is_usable", lambda: checked.append(True) or True)
    try:
        connection.close_if_health_check_failed()
        assert checked == [True]
        assert connection.connection is raw
    finally:
        raw.execute("ROLLBACK")
