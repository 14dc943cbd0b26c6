# The search service: onnxruntime, FAISS and FastAPI, without torch.
#
#   docker build -f docker/service.Dockerfile -t idml-search .
#   docker run --rm -p 127.0.0.1:8000:8000 -v "$PWD/models:/models:ro" -v idml-index:/data/index \
#       -e IDML_API_KEY=... idml-search
#
# The bundle (IDML_BUNDLE) and the index (IDML_INDEX) come from volumes; docker-compose.yml
# builds the index with scripts/ensure-index.sh before the server starts.
# NOTE: tests/test_compose.py checks these instructions, but no test builds the image.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

WORKDIR /app
COPY . /app

# The same install script as local installs and CI, so the image runs what the tests ran.
RUN scripts/install.sh --serve \
    && useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent idml \
    && mkdir -p /data/index \
    && chown idml:idml /data/index

# A new named volume mounted at /data/index copies this folder's owner, so the
# unprivileged user can write the index into it.
USER idml

ENV IDML_BUNDLE=/models/default \
    IDML_INDEX=/data/index \
    IDML_HOST=0.0.0.0 \
    IDML_PORT=8000

EXPOSE 8000

# The slim image has no curl, so the check uses the standard library.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('IDML_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["idml-serve"]
