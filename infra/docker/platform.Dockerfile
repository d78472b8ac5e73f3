# syntax=docker/dockerfile:1.7
# Serve + train image (Ray Serve app, Ray Train job, Feast feature server) for the Helm chart's
# RayService, RayJob and Feast Deployment. Build from the repository root:
#   docker build -f infra/docker/platform.Dockerfile -t registry.example.com/recsys/platform:0.1.0 .
# The base image ships the same Ray and Python as constraints.txt (ray==2.55.1, Python 3.11);
# everything else is installed under the project's constraints. Runs as uid 1000 (user "ray").
ARG RAY_IMAGE=rayproject/ray:2.55.1-py311-cpu
FROM ${RAY_IMAGE}

USER root
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/*
USER 1000:100

WORKDIR /opt/recsys
COPY --chown=1000:100 constraints.txt pyproject.toml README.md ./
COPY --chown=1000:100 core ./core
COPY --chown=1000:100 platform ./platform
COPY --chown=1000:100 pipelines ./pipelines
COPY --chown=1000:100 models ./models
COPY --chown=1000:100 feature_repo ./feature_repo
# A regular (non-editable) install: the image needs no source tree at run time, only the
# feature repository the Feast server reads.
RUN pip install --no-cache-dir -c constraints.txt . \
 && rm -rf platform pipelines models \
 && recsys --help > /dev/null

ENV RECSYS_PROFILE=k8s \
    PYTHONUNBUFFERED=1
