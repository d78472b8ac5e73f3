# syntax=docker/dockerfile:1.7
# Prefect worker for a Kubernetes work pool (the chart's Prefect worker Deployment); the same
# image runs `prefect server start` in the compose file. Build from the repository root:
#   docker build -f infra/docker/prefect-worker.Dockerfile -t registry.example.com/recsys/prefect-worker:3.5.0-recsys0.1.0 .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
FROM ${PYTHON_IMAGE}
# prefect-kubernetes is not a dependency of the project; 0.7.4 is the newest release that
# accepts prefect 3.5.0 (0.7.5 and later need prefect>=3.6.17).
ARG PREFECT_KUBERNETES_VERSION=0.7.4

COPY constraints.txt /tmp/constraints.txt
RUN pip install --no-cache-dir -c /tmp/constraints.txt \
        prefect==3.5.0 "prefect-kubernetes==${PREFECT_KUBERNETES_VERSION}" \
 && rm /tmp/constraints.txt \
 && groupadd --system --gid 10001 prefect \
 && useradd --system --uid 10001 --gid prefect --home-dir /tmp prefect

USER 10001:10001
ENV HOME=/tmp \
    PREFECT_HOME=/tmp/prefect \
    PYTHONUNBUFFERED=1
ENTRYPOINT ["prefect"]
CMD ["worker", "start", "--pool=recsys-k8s", "--type=kubernetes", "--with-healthcheck"]
