#!/usr/bin/env bash
# Stops what up.sh started. See services.sh.
exec "$(dirname "${BASH_SOURCE[0]}")/services.sh" stop
