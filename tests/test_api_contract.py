"""The OpenAPI schema is the contract: schemathesis, the outside contract tester, runs every check
and every phase (examples, coverage, fuzzing, and stateful sequences that follow the schema's
links from a created image or batch to the operations taking its id) against the API served over
real HTTP with a client's key, and finds no 5xx and no difference between schema and behaviour.

tests/schemathesis_hooks.py supplies what a schema cannot say (real photos for the image parts,
reachable URLs for positive cases) and drops, each with its reason in dropped.txt, the failures
that are not differences between schema and behaviour. Its reports (JUnit XML, the output with
`st replay` commands for failing cases, dropped.txt) go to test-output/schemathesis/. Bounded:
a few hundred cases, each request with a timeout."""

import os
import re
import subprocess

import pytest

from tests.conftest import ROOT, drain

pytestmark = pytest.mark.django_db(transaction=True)

REPORTS = ROOT / "test-output" / "schemathesis"
# Cases per operation and phase; with 10 operations, a few hundred requests in all.
MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "12"))


def test_schemathesis_finds_no_difference_between_schema_and_behaviour(live_server, integrator):
    REPORTS.mkdir(parents=True, exist_ok=True)
    command = [
        str(ROOT / ".venv" / "bin" / "schemathesis"), "run", f"{live_server.url}/api/schema/",
        "--checks", "all", "--phases", "examples,coverage,fuzzing,stateful",
        "--header", f"Authorization: Bearer {integrator[1]}",
        "--max-examples", str(MAX_EXAMPLES), "--request-timeout", "20", "--workers", "1",
        "--report", "junit", "--report-junit-path", str(REPORTS / "junit.xml"), "--no-color",
    ]
    dropped = REPORTS / "dropped.txt"
    dropped.unlink(missing_ok=True)
    env = dict(os.environ, SCHEMATHESIS_HOOKS="tests.schemathesis_hooks", PYTHONPATH=str(ROOT),
               SCHEMATHESIS_DROPPED_LOG=str(dropped))
    try:
        # Run from the reports folder: schemathesis keeps its cache of failing cases (for
        # `st replay ID`) in .schemathesis/ of its working directory.
        result = subprocess.run(command, cwd=REPORTS, env=env, capture_output=True, text=True, timeout=300)
    finally:
        # What the accepted submissions queued must not reach another test's worker.
        drain("detect")
        drain("callbacks")
    (REPORTS / "output.txt").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, result.stdout[-15000:] + result.stderr[-3000:]
    # The stateful phase followed the links (a run that reaches no operation through them proves little).
    covered = re.search(r"API Links:\s+(\d+) covered", result.stdout)
    assert covered and int(covered[1]) >= 5, result.stdout[-3000:]
