# syntax=docker/dockerfile:1
#
# The Tandem image: every component (`tandem router|prefill|decode|serve`) from one image.
#
#   GPU (default):  docker build -t tandem:0.1.0-cuda .
#   CPU:            docker build --build-arg VARIANT=cpu -t tandem:0.1.0-cpu .
#
# Stages: base-cuda / base-cpu (runtime OS and Python), builder (a virtualenv with torch and
# Tandem), runtime (the virtualenv and the source tree, a non-root user).
# The source tree is installed in editable mode so the bundled model (models/tandem-tiny,
# the CLI's default --model) stays where the code looks for it.

ARG VARIANT=cuda
# CUDA runtime base of the GPU image (Ubuntu 24.04 ships Python 3.12).
ARG CUDA_BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
# Base of the CPU image.
ARG CPU_BASE=python:3.12-slim-bookworm

# ---- runtime bases ----------------------------------------------------------------
FROM ${CUDA_BASE} AS base-cuda
# gcc, libc6-dev and python3-dev: Triton compiles its small launcher stubs at run time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
      ca-certificates redis-server \
 && rm -rf /var/lib/apt/lists/*

FROM ${CPU_BASE} AS base-cpu
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates redis-server \
 && rm -rf /var/lib/apt/lists/*

FROM base-${VARIANT} AS base
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# ---- builder ------------------------------------------------------------------------
FROM base AS builder
ARG VARIANT
# torch requirement; the GPU image needs a CUDA build (PyPI's Linux wheels are), the CPU
# image the CPU build from TORCH_INDEX_URL.
ARG TORCH_SPEC="torch>=2.4"
ARG TORCH_INDEX_URL=""
RUN python3 -m venv /opt/venv
RUN --mount=type=cache,target=/root/.cache/pip \
    if [ -n "$TORCH_INDEX_URL" ]; then \
      pip install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"; \
    elif [ "$VARIANT" = "cpu" ]; then \
      pip install --index-url https://download.pytorch.org/whl/cpu "$TORCH_SPEC"; \
    else \
      pip install "$TORCH_SPEC"; \
    fi
COPY . /opt/tandem/app
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -e /opt/tandem/app \
 && python3 -c "import cli.main, engine.worker_config as w; assert w.BUNDLED_MODEL_DIR.is_dir(), w.BUNDLED_MODEL_DIR"

# ---- runtime ------------------------------------------------------------------------
FROM base AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="tandem" \
      org.opencontainers.image.description="LLM serving with disaggregated prefill and decode over gRPC" \
      org.opencontainers.image.licenses="Apache-2.0" \
      dev.tandem.variant="${VARIANT}"
RUN groupadd --system --gid 10001 tandem \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin tandem
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/tandem/app /opt/tandem/app
# Everything written at run time goes under /tmp (an emptyDir in Kubernetes), so the root
# filesystem can be mounted read-only.
ENV HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/.cache/huggingface \
    TRITON_CACHE_DIR=/tmp/.cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/tmp/.cache/inductor \
    TANDEM_HEALTH_TARGET=127.0.0.1:50051
WORKDIR /opt/tandem/app
USER 10001:10001
# router gRPC, prefill gRPC, decode gRPC, decode KV transfer, metrics (router, prefill, decode).
EXPOSE 50051 50061 50062 50071 9090 9091 9092
# grpc.health.v1 Check of the overall service ("") at TANDEM_HEALTH_TARGET; exit 0 only when SERVING.
# With TLS on, point TANDEM_HEALTH_TLS_CA at the CA that signed the server's certificate (whose
# names must include the target's host), and under mutual TLS TANDEM_HEALTH_TLS_CERT and
# TANDEM_HEALTH_TLS_KEY at a client certificate: the same files as the --tls-* flags.
# (Kubernetes ignores HEALTHCHECK: the chart uses native gRPC probes.)
HEALTHCHECK --interval=15s --timeout=6s --start-period=300s --retries=3 \
  CMD python3 -c "import os,sys,grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; e=os.environ.get; pem=lambda k: open(e(k),'rb').read() if e(k) else None; t=e('TANDEM_HEALTH_TARGET'); tls=e('TANDEM_HEALTH_TLS_CA') or e('TANDEM_HEALTH_TLS_CERT'); ch=grpc.secure_channel(t, grpc.ssl_channel_credentials(pem('TANDEM_HEALTH_TLS_CA'), pem('TANDEM_HEALTH_TLS_KEY'), pem('TANDEM_HEALTH_TLS_CERT'))) if tls else grpc.insecure_channel(t); r=g.HealthStub(ch).Check(h.HealthCheckRequest(service=''), timeout=5); sys.exit(0 if r.status == h.HealthCheckResponse.SERVING else 1)"
ENTRYPOINT ["tandem"]
CMD ["serve", "--host", "0.0.0.0"]
