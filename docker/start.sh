#!/bin/bash
# Start the persistent DD-UGM server (loopback only), then Gadgetron's own entrypoint.
set -e
ddugm serve --host 127.0.0.1 --port "${DDUGM_PORT:-18000}" &
exec /opt/entrypoint.sh "$@"
