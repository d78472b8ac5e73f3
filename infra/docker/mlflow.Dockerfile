# syntax=docker/dockerfile:1.7
# MLflow tracking server for the chart's MLflow Deployment and the compose file: PostgreSQL
# backend (psycopg 3) and S3-compatible artifacts (boto3). Build from the repository root:
#   docker build -f infra/docker/mlflow.Dockerfile -t registry.example.com/recsys/mlflow:3.17.2-recsys0.1.0 .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
FROM ${PYTHON_IMAGE}
# boto3 is not a dependency of the project, so it is pinned here.
ARG BOTO3_VERSION=1.44.8

COPY constraints.txt /tmp/constraints.txt
RUN pip install --no-cache-dir -c /tmp/constraints.txt \
        mlflow==3.17.2 "psycopg[binary]" "boto3==${BOTO3_VERSION}" \
 && rm /tmp/constraints.txt \
 && groupadd --system --gid 10001 mlflow \
 && useradd --system --uid 10001 --gid mlflow --home-dir /tmp mlflow

USER 10001:10001
ENV HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
EXPOSE 5000
ENTRYPOINT ["mlflow"]
CMD ["server", "--host=0.0.0.0", "--port=5000"]
