# syntax=docker/dockerfile:1.7
# Flink 2.3 + PyFlink + the Kafka SQL connector, running the stream job
# `recsys_pipelines.stream.job` under the Flink Kubernetes Operator (FlinkDeployment).
# Build from the repository root:
#   docker build -f infra/docker/flink.Dockerfile -t registry.example.com/recsys/flink:2.3.0-recsys0.1.0 .
# Python 3.11 (the project's interpreter) comes from the python image; the Flink distribution,
# its entrypoint and layout (/opt/flink, uid 9999) from the official Flink image.
ARG FLINK_IMAGE=flink:2.3.0-scala_2.12-java17
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
FROM ${FLINK_IMAGE} AS flink

FROM ${PYTHON_IMAGE}
ARG FLINK_VERSION=2.3.0
# Kafka connector for Flink 2.x, from Maven Central; verified against its published SHA-1.
ARG KAFKA_CONNECTOR_VERSION=4.0.1-2.0
# What the stream job imports (PyFlink, the floor-0 platform modules, Feast's Redis key and
# value encoding), not the whole project: no torch, no Ray in the Flink image. Keep in step
# with the imports of recsys_pipelines.stream.
ARG STREAM_REQUIREMENTS="apache-flink==2.3.0 feast[redis] protobuf redis pydantic pydantic-settings pyyaml pyarrow pandas numpy"

RUN apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless curl gosu \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 9999 flink \
 && useradd --system --uid 9999 --gid flink --home-dir /opt/flink flink
COPY --from=flink --chown=flink:flink /opt/flink /opt/flink
COPY --from=flink /docker-entrypoint.sh /docker-entrypoint.sh
ENV FLINK_HOME=/opt/flink \
    JAVA_HOME=/usr/lib/jvm/java-17-openjdk-amd64 \
    PATH=/opt/flink/bin:$PATH \
    PYTHONUNBUFFERED=1

RUN set -eux; \
    jar="flink-sql-connector-kafka-${KAFKA_CONNECTOR_VERSION}.jar"; \
    url="https://repo1.maven.org/maven2/org/apache/flink/flink-sql-connector-kafka/${KAFKA_CONNECTOR_VERSION}/${jar}"; \
    curl -fsSL -o "/opt/flink/lib/${jar}" "${url}"; \
    echo "$(curl -fsSL "${url}.sha1")  /opt/flink/lib/${jar}" | sha1sum -c -; \
    mkdir -p /opt/flink/plugins/s3-fs-hadoop; \
    cp "/opt/flink/opt/flink-s3-fs-hadoop-${FLINK_VERSION}.jar" /opt/flink/plugins/s3-fs-hadoop/; \
    test -f "/opt/flink/opt/flink-python-${FLINK_VERSION}.jar"; \
    chown -R flink:flink /opt/flink/lib /opt/flink/plugins

WORKDIR /opt/recsys
COPY constraints.txt pyproject.toml README.md ./
COPY core ./core
COPY platform ./platform
COPY pipelines ./pipelines
COPY models ./models
RUN pip install --no-cache-dir -c constraints.txt ${STREAM_REQUIREMENTS} \
 && pip install --no-cache-dir --no-deps . \
 && rm -rf platform pipelines models \
 && python -c "import pyflink, recsys_pipelines.stream.job"

USER 9999:9999
WORKDIR /opt/flink
ENV RECSYS_PROFILE=k8s
ENTRYPOINT ["/docker-entrypoint.sh"]
EXPOSE 6123 8081
CMD ["help"]
