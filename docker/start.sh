#!/bin/bash
# Start the persistent DD-UGM server (loopback only: 127.0.0.1 and ::1) unless DDUGM_SERVE=0,
# then Gadgetron's own entrypoint. Chains with <execute> need no server.
set -e
if [ "${DDUGM_SERVE:-1}" != "0" ]; then
    ddugm serve --port "${DDUGM_PORT:-18000}" &
fi
exec /opt/entrypoint.sh "$@"
