"""Helper of services.sh: reads the ``services`` settings profile and prepares PostgreSQL.

``env`` prints shell assignments (addresses, ports, directories) taken from
``load_settings("services")`` so the script and the platform agree on one source of truth;
``create-db URL...`` creates each PostgreSQL database that does not exist yet.
"""

from __future__ import annotations

import shlex
import sys
from urllib.parse import urlparse

import psycopg
from psycopg import sql

from recsys_core.settings import load_settings


def shell_env() -> str:
    """Shell assignments for services.sh, from the services profile (env vars apply)."""
    settings = load_settings("services")
    mlflow = urlparse(settings.mlflow_tracking_uri)
    prefect = urlparse(settings.prefect.api_url or "")
    if mlflow.scheme != "http" or prefect.scheme != "http":
        raise SystemExit("services profile: mlflow.tracking_uri and prefect.api_url must be "
                         f"http URLs, got {mlflow.geturl()!r} and {prefect.geturl()!r}")
    values = {
        "DATA_DIR": settings.data_dir.resolve().as_posix(),
        "MLFLOW_HOST": mlflow.hostname or "127.0.0.1",
        "MLFLOW_PORT": str(mlflow.port or 80),
        "MLFLOW_ARTIFACTS": settings.path(settings.mlflow.artifact_location),
        "PREFECT_HOST": prefect.hostname or "127.0.0.1",
        "PREFECT_PORT": str(prefect.port or 80),
        "PREFECT_API": settings.prefect.api_url or "",
        "FEAST_REGISTRY": settings.feast.registry_path if settings.feast.registry == "sql"
        else "",
    }
    return "\n".join(f"{key}={shlex.quote(value)}" for key, value in values.items())


def create_databases(urls: list[str]) -> None:
    """Creates the database of each PostgreSQL URL if missing (connects to ``postgres``)."""
    for url in urls:
        parsed = urlparse(url)
        if not parsed.scheme.startswith("postgresql"):
            continue
        name = parsed.path.lstrip("/")
        admin = psycopg.conninfo.make_conninfo(
            host=parsed.hostname or "127.0.0.1", port=parsed.port or 5432,
            user=parsed.username or "postgres", password=parsed.password or None,
            dbname="postgres")
        with psycopg.connect(admin, autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                  (name,)).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                sys.stderr.write(f"created database {name}\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["env"]:
        sys.stdout.write(shell_env() + "\n")
    elif sys.argv[1:2] == ["create-db"]:
        create_databases(sys.argv[2:])
    else:
        raise SystemExit("usage: services_config.py env | create-db URL...")
