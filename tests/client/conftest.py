"""Fixtures of the client tests: the fault suite's whole stack (gunicorn, workers, beat on a
database and bucket of their own), reused as is."""

from tests.faults.conftest import make_stack, storage_proxy

__all__ = ["make_stack", "storage_proxy"]  # fixtures, found by pytest under these names
