"""Fixtures of the client tests: the fault suite's whole stack (gunicorn, workers, beat on a
database and bucket of their own), reused as is."""

from tests.faults.conftest import make_stack

__all__ = ["make_stack"]  # a fixture, found by pytest under this name
