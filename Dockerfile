# The hotknob sidecar: the daemon and its CLI, without torch.
#
# The base distribution has no torch dependency (torch is the `torch` extra, for the
# training process only), so this image stays small. Build from the repository root:
#   docker build -t hotknob:0.1.0 .
# See docs/deploy.md for volumes, environment, the uid rule and the probes.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY config/ config/
COPY daemon/ daemon/
COPY model_runtime/ model_runtime/
RUN python -m venv /opt/hotknob \
    && /opt/hotknob/bin/pip install --no-cache-dir . \
    && /opt/hotknob/bin/hotknob --help > /dev/null \
    && ! /opt/hotknob/bin/python -c "import torch" 2> /dev/null

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="hotknob" \
      org.opencontainers.image.description="hotknob sidecar: retune a running PyTorch process without a restart" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric uid: Kubernetes can then verify runAsNonRoot from the image alone, and
# the training container must run as this same uid (the daemon checks SO_PEERCRED).
ARG HOTKNOB_UID=10001
RUN groupadd --system --gid "${HOTKNOB_UID}" hotknob \
    && useradd --system --no-log-init --uid "${HOTKNOB_UID}" --gid hotknob \
       --home-dir /var/lib/hotknob --shell /usr/sbin/nologin hotknob \
    && install -d -o hotknob -g hotknob -m 0700 /run/hotknob /var/lib/hotknob

COPY --from=build /opt/hotknob /opt/hotknob

# The socket lives one folder below the volume: the daemon creates that folder 0700 itself,
# which works even when the volume's root is world-writable (a Kubernetes emptyDir is).
ENV PATH=/opt/hotknob/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOTKNOB_SOCKET=/run/hotknob/sock/hotknob.sock \
    HOTKNOB_STATE_DIR=/var/lib/hotknob \
    HOTKNOB_METRICS_ADDR=0.0.0.0:9108

VOLUME ["/run/hotknob", "/var/lib/hotknob"]
EXPOSE 9108
USER ${HOTKNOB_UID}:${HOTKNOB_UID}
WORKDIR /var/lib/hotknob

# /healthz answers 200 once a validated snapshot is served (also the last-known-good while
# etcd is down) and 503 before; urlopen raises on 503, so the exit status follows it.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; h, _, p = os.environ.get('HOTKNOB_METRICS_ADDR', '0.0.0.0:9108').rpartition(':'); h = h if h not in ('', '0.0.0.0') else '127.0.0.1'; u.urlopen(f'http://{h}:{p}/healthz', timeout=4)"]

ENTRYPOINT ["hotknob", "run"]
