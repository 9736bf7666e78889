"""`make run`: the local S3 server when none is configured, then the Procfile's processes under
honcho in the foreground; Ctrl-C or SIGTERM stops all of them, the S3 server last.

With no MINIO_ENDPOINT (and STORAGE_BACKEND not `filesystem`) the settings point storage at
127.0.0.1:LOCAL_S3_PORT with the keys of run/s3/identities.json (generated on first use); this
starts SeaweedFS there with its data in run/s3/data and creates the bucket.
"""

import os
import signal
import subprocess
import sys

from stack.processes import descendant_groups
from stack.resources import BIN, ROOT
from stack.s3 import S3Server

HONCHO_STOP = 15  # honcho itself SIGKILLs its processes 5 s after passing on SIGTERM


def local_s3(settings):
    """The S3 server of `make run` (not started yet); None where storage is elsewhere."""
    if settings.STORAGE_BACKEND != "minio" or not settings.LOCAL_S3:
        return None
    return S3Server(settings.LOCAL_S3_DIR, port=settings.LOCAL_S3_PORT, access_key=settings.MINIO_ACCESS_KEY,
                    secret_key=settings.MINIO_SECRET_KEY)


def start_s3(server, bucket):
    note(f"starting the S3 server (SeaweedFS) on {server.endpoint}, data in {_shown(server.dir / 'data')}, "
         f"log {_shown(server.log_path)}")
    server.start()
    server.make_bucket(bucket)
    note(f"S3 server ready, bucket {bucket}")


def main():
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "face_detect_api.settings")
    from django.conf import settings

    stopping = []

    def on_signal(signum, frame):
        stopping.append(signum)
        if honcho is None:
            raise KeyboardInterrupt
        if honcho.poll() is None:
            honcho.send_signal(signal.SIGTERM)  # Ctrl-C reached honcho too; SIGTERM may not have

    honcho = server = None
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        server = local_s3(settings)
        if server is not None:
            start_s3(server, settings.MINIO_BUCKET)
        honcho = subprocess.Popen([str(BIN / "honcho"), "start", "--port", str(settings.PORT)], cwd=ROOT)
        while honcho.poll() is None:
            try:
                honcho.wait(timeout=HONCHO_STOP if stopping else None)
            except subprocess.TimeoutExpired:
                note("honcho did not stop in time: killing it")
                stop_process_group_of(honcho)
        return honcho.returncode if not stopping else 0
    except KeyboardInterrupt:
        return 130
    except RuntimeError as error:  # the S3 server would not start (its port taken, say)
        note(f"error: {error}\n(LOCAL_S3_PORT picks another port; MINIO_ENDPOINT an S3 server of your own)")
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if server is not None:
            note("stopping the S3 server")
            server.stop()


def stop_process_group_of(proc):
    """SIGKILL honcho and the process group of each process it started (one session each)."""
    groups = descendant_groups(proc.pid)
    proc.kill()
    proc.wait(10)
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _shown(path):
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def note(message):
    print(f"stack.run | {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
