"""One way to start the platform on this machine, shared by `make run` (stack.run), `make demo`
(scripts/demo.py), the benchmarks (bench/stack.py) and the fault tests (tests/faults/harness.py).

A `Stack` is one whole instance on resources of its own: an S3 server (SeaweedFS, its own or a
shared one) and a bucket on it (or a directory, for `storage="filesystem"`), a RabbitMQ vhost, a
PostgreSQL database (migrated, or cloned from a migrated one), and the Procfile's processes.
`close()` stops the processes and removes everything it made, in reverse order, each step bounded.
"""

import logging
import re
import shutil
import tempfile
import uuid
from pathlib import Path

from stack.processes import Platform, procfile, stop_process_group, wait_until
from stack.resources import BIN, ROOT, Database, Vhost, free_port, manage
from stack.s3 import S3Server

__all__ = ["BIN", "ROOT", "Database", "Platform", "S3Server", "Stack", "Vhost", "free_port", "manage", "procfile",
           "stop_process_group", "wait_until"]

logger = logging.getLogger(__name__)


class Stack(Platform):
    """The Procfile's processes on a database, vhost and bucket of their own.

    s3: a running S3Server to put the bucket on (None: start one of the stack's own);
    storage: "s3" or "filesystem" (a temporary MEDIA_ROOT); broker_url: a broker to use instead
    of a vhost of the stack's own; database: a Database to use (created here) instead of
    `face_detect_<name>` on the local server; template: a migrated database to clone instead of
    migrating; logdir: where the process logs go and stay (default: a temporary folder,
    removed). Everything it makes is undone by close().
    """

    def __init__(self, name, env=None, *, s3=None, storage="s3", broker_url=None, database=None, template=None,
                 logdir=None, port=None):
        self._undo = []
        suffix = uuid.uuid4().hex[:6]
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "stack"
        env = dict(env or {})
        try:
            if storage == "s3":
                if s3 is None:
                    s3 = self._own_s3(name)
                self.bucket = s3.make_bucket(f"{slug}-{suffix}")
                env = {**s3.env(self.bucket), **env}
            else:
                media = Path(tempfile.mkdtemp(prefix=f"face-detect-{name}-media-"))
                self._undo.append(lambda: shutil.rmtree(media, ignore_errors=True))
                self.bucket = None
                env = {"STORAGE_BACKEND": "filesystem", "MINIO_ENDPOINT": "", "MEDIA_ROOT": str(media), **env}
            self.s3 = s3
            if broker_url is None:
                vhost = Vhost(f"face_detect_{slug}_{suffix}").create()
                self._undo.append(vhost.delete)
                broker_url = vhost.url
            env.setdefault("CELERY_BROKER_URL", broker_url)
            self.database = database or Database(f"face_detect_{slug.replace('-', '_')}_{suffix}")
            env.setdefault("DATABASE_URL", self.database.url)
            super().__init__(env, name=name, logdir=logdir, port=port)
            if logdir is None:  # a log folder asked for is kept, to be read afterwards
                self._undo.append(lambda: shutil.rmtree(self.logdir, ignore_errors=True))
            self._undo.append(self.database.drop)
            if template:
                self.database.clone(template)
            else:
                self.database.create(self.env)
            self._undo.append(self.stop)
        except BaseException:
            self.close()
            raise

    def _own_s3(self, name):
        directory = Path(tempfile.mkdtemp(prefix=f"face-detect-{name}-s3-"))
        self._undo.append(lambda: shutil.rmtree(directory, ignore_errors=True))
        server = S3Server(directory)
        self._undo.append(server.stop)
        return server.start()

    def close(self):
        """Stop every process and remove what the stack made; a failing step does not stop the rest."""
        while self._undo:
            step = self._undo.pop()
            try:
                step()
            except Exception as error:  # go on: the rest must still be cleaned up
                logger.warning("stack clean-up step failed: %r", error)
