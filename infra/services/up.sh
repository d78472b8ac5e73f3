#!/usr/bin/env bash
# Starts the `services` profile locally (MLflow on PostgreSQL, Prefect server). See services.sh.
exec "$(dirname "${BASH_SOURCE[0]}")/services.sh" start
