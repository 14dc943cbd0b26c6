# Training: torch (CPU build), onnx and scikit-learn, plus the tools the emoji data script
# needs (npm to fetch the pinned packages, rsvg-convert to render SVGs).
#
#   docker compose run --rm --entrypoint python trainer scripts/fetch_emoji_dataset.py
#   docker compose run --rm trainer train --config configs/emoji.yaml
#   docker compose run --rm trainer export runs/emoji/best.pt --out models/emoji-v2
#
# docker-compose.yml mounts ./data, ./runs, ./models and ./configs into /app, so relative
# paths in configs and commands mean the same inside the container as in a checkout.
# NOTE: tests/test_compose.py checks these instructions, but no test builds the image.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends librsvg2-bin npm \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY . /app

# PyPI's Linux torch wheels are CUDA builds of several GB; the PyTorch CPU index serves
# torch==2.13.0+cpu, which satisfies the torch==2.13.0 pin.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN PIP_EXTRA_INDEX_URL="$TORCH_INDEX_URL" scripts/install.sh --train \
    && useradd --uid 1000 --user-group --create-home idml

# docker-compose.yml may run the container as another user id (IDML_UID), which has no
# home folder, so caches go to /tmp.
ENV HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    npm_config_cache=/tmp/npm-cache

USER idml

ENTRYPOINT ["idml-train"]
CMD ["--help"]
