"""The platform's processes as the Procfile names them, started the way `make run` starts them:
each in a process group of its own with a log file, stopped with SIGTERM, a bounded wait and
SIGKILL for whatever is left of the group.

The Procfile is read, not copied: an entry added to it (another worker pool, say) is started by
`start_all()` too, and waited for by what its command line says it is (gunicorn: the API answers;
a prefork worker consuming a `detect…` queue: every pool child has loaded its detector; any other
Celery worker: Celery's "ready." line; beat: nothing to wait for).
"""

import json
import os
import re
import shlex
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from stack.resources import ROOT, die_with_parent, free_port, manage

STOP_GRACE = 8.0


def procfile(path=ROOT / "Procfile"):
    """{entry name: command line} of the Procfile, in its order."""
    entries = {}
    for line in Path(path).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, command = line.partition(":")
            entries[name.strip()] = command.strip()
    return entries


def stop_process_group(proc, grace=STOP_GRACE):
    """SIGTERM the process group `proc` leads, wait up to `grace` seconds, then SIGKILL the group
    (pool children or gunicorn workers may outlive their parent)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def descendant_groups(pid):
    """Process groups of `pid`'s descendants, our own excepted (honcho starts each process in a
    session of its own)."""
    groups, pending = set(), [pid]
    while pending:
        parent = pending.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                continue
            for child in children:
                try:
                    groups.add(os.getpgid(child))
                except ProcessLookupError:
                    continue
                pending.append(child)
    groups.discard(os.getpgid(0))
    return groups


def _option(argv, *names):
    for index, word in enumerate(argv[:-1]):
        if word in names:
            return argv[index + 1]
    return None


def _runs_detection(argv):
    """A Celery prefork worker consuming a `detect…` queue: each pool child loads a detector."""
    if not argv or Path(argv[0]).name != "celery" or "worker" not in argv:
        return False
    pool = _option(argv, "--pool", "-P") or "prefork"
    return pool == "prefork" and any(q.startswith("detect") for q in (_option(argv, "-Q", "--queues") or "").split(","))


def wait_until(predicate, timeout, what, interval=0.2):
    """Poll until predicate() is truthy; TimeoutError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class Platform:
    """The Procfile's processes sharing one environment, on a free port, logs in `logdir`."""

    stop_grace = STOP_GRACE

    def __init__(self, env, name="stack", logdir=None, port=None):
        self.name = name
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.logdir = Path(logdir or tempfile.mkdtemp(prefix=f"face-detect-{name}-"))
        self.env = {**os.environ, "GUNICORN_WORKERS": "2", "WORKER_CONCURRENCY": "2", **env,
                    "PORT": str(self.port), "PUBLIC_BASE_URL": self.base_url}
        self.entries = procfile()
        self.procs = {}
        self.argvs = {}
        self._ready = {}

    # --- starting ---

    def command(self, entry, **env):
        """The Procfile's command line for `entry`, its $VARIABLES filled in from the environment."""
        values = {**self.env, **env}
        return [re.sub(r"\$(\w+)", lambda m: values[m.group(1)], word) for word in shlex.split(self.entries[entry])]

    def spawn(self, name, argv):
        with open(self.logdir / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True,
                                                preexec_fn=die_with_parent)
        return self.procs[name]

    def start(self, entry, name=None, wait=True, timeout=180, **env):
        """Start a Procfile entry (as `name`: a second copy of a worker gets its own node name, as
        on another machine); wait until it is ready unless `wait` is false."""
        name = name or entry
        argv = self.command(entry, **env)
        node = _option(argv, "-n", "--hostname")
        if node and name != entry:
            argv[argv.index(node)] = f"{name}@{node.partition('@')[2]}"
        schedule = _option(argv, "--schedule", "-s")
        if schedule and "beat" in argv:
            argv[argv.index(schedule)] = str(self.logdir / f"{name}-schedule")
        self.argvs[name] = argv
        self._ready[name] = self._readiness(name, argv)
        self.spawn(name, argv)
        if wait:
            self.wait_ready(name, timeout)
        return self.procs[name]

    def start_all(self, timeout=180, exclude=(), **env):
        """Every Procfile entry but those in `exclude`, started together, then waited for."""
        entries = [entry for entry in self.entries if entry not in exclude]
        for entry in entries:
            self.start(entry, wait=False, **env)
        for entry in entries:
            self.wait_ready(entry, timeout)

    def _readiness(self, name, argv):
        """A predicate saying the process started from `argv` is ready to work."""
        program = Path(argv[0]).name
        if program == "gunicorn":
            return self.api_answers
        if program == "celery" and "worker" in argv:
            if _runs_detection(argv):
                marker, count = "detector ready", int(_option(argv, "--concurrency", "-c") or os.cpu_count() or 1)
            else:
                marker, count = " ready.", 1
            before = self.log(name).count(marker)
            return lambda: self.log(name).count(marker) >= before + count
        return lambda: True

    def is_detect_worker(self, name):
        """Whether the process started as `name` is a prefork pool whose children run the detector."""
        return _runs_detection(self.argvs.get(name, []))

    def wait_ready(self, name, timeout=180):
        def ready():
            proc = self.procs[name]
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode}):\n{self.log(name)[-3000:]}")
            return self._ready[name]()

        wait_until(ready, timeout, f"{name} of {self.name} to be ready ({self.logdir / name}.log)")

    def api_answers(self):
        import requests

        try:
            return requests.get(f"{self.base_url}/api/v1/health/", timeout=2).status_code in (200, 503)
        except requests.RequestException:
            return False

    def queues(self):
        """Every queue a Procfile worker consumes."""
        found = []
        for entry in self.entries:
            argv = shlex.split(self.entries[entry])
            found += [q for q in (_option(argv, "-Q", "--queues") or "").split(",") if q and q not in found]
        return found

    # --- looking at them ---

    def log(self, name):
        path = self.logdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def detect_log(self):
        """The logs of every detect worker started, one after the other."""
        return "".join(self.log(name) for name in self.procs if self.is_detect_worker(name))

    def pool_children(self, name):
        """PIDs of a prefork worker's pool processes (or a gunicorn master's workers)."""
        pid = self.procs[name].pid
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]

    def manage(self, *args, timeout=300):
        return manage(self.env, *args, timeout=timeout)

    def create_client(self, prefix=None):
        """`manage.py create_client`: {"client", "api_key", "webhook_secret"}."""
        return json.loads(self.manage("create_client", f"{prefix or self.name}-{time.monotonic_ns()}"))

    # --- stopping ---

    def kill(self, name, sig=signal.SIGKILL, wait=30):
        """Send `sig` to one process's group and wait for its leader to exit."""
        proc = self.procs[name]
        os.killpg(proc.pid, sig)
        proc.wait(wait)

    def stop(self, grace=None):
        """Every process: SIGTERM to all groups at once, then each waited for (`stop_grace`
        seconds in all), then SIGKILL."""
        grace = self.stop_grace if grace is None else grace
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            stop_process_group(proc, grace=max(0.1, deadline - time.monotonic()))
