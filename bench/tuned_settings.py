"""The platform's settings plus the optimizations `bench.ingest` measures (its `tuned` variant).

Not part of the platform: everything the platform reads is left as it is, except what a patch
named in TUNED_PATCHES (comma-separated, default all; see bench/tuned_patches.py) changes.
"""

import os

from face_detect_api.settings import *  # noqa: F403
from bench.tuned_patches import ALL_PATCHES

_wanted = os.environ.get("TUNED_PATCHES", "all").strip()
TUNED_PATCHES = ALL_PATCHES if _wanted in ("", "all") else tuple(p.strip() for p in _wanted.split(",") if p.strip())
_unknown = set(TUNED_PATCHES) - set(ALL_PATCHES) - {"none"}
if _unknown:
    raise ValueError(f"TUNED_PATCHES: unknown {', '.join(sorted(_unknown))}; known: {', '.join(ALL_PATCHES)}")

# Its own queue, so `bench.ingest` can count the tuned variant's messages apart from the platform's.
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("TUNED_QUEUE", "tuned_detect")
