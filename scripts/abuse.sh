#!/usr/bin/env bash
# Replays the attacks the relay was hardened against (slow readers,
# slowloris, idle TCP flood, WebSocket slot grab, stalled archive uploads,
# rate-limit table flood, homed-table flood, disk fill, connection churn)
# against a release build, and prints per attack whether the relay stayed
# within its memory budget and kept serving a well-behaved control client.
#
#   scripts/abuse.sh [FLAGS]        e.g. --only slowloris,homed   --json
#
# The flags are `meshwhisper bench abuse`'s (see --help there); the relay
# is started by the bench itself on a temporary directory, loopback only.
# Exits 1 when an attack failed. Linux only (binds 127.x.y.z source
# addresses, reads /proc).
set -Eeuo pipefail
cd "$(dirname "$0")/.."
BIN=target/release/meshwhisper
[ -x "$BIN" ] || cargo build --release -p meshwhisper
exec "$BIN" bench abuse "$@"
