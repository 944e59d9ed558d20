#!/usr/bin/env bash
# Stops the testnet's relays (SIGTERM, then SIGKILL after 10 s) and forgets
# the relay table. Data and logs stay in the run directory; pass --clean to
# remove them too.
#
# Also stops what a half-finished up.sh left: an up.sh still starting the
# testnet (it stops its relays itself), and relays recorded in its partial
# table or pid file, or found by their data directory in the run directory.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"

status=0

STOP_GRACE=10

clean=0
if [ "${1:-}" = "--clean" ]; then clean=1; fi

state=0 # any table or pid file: a testnet, complete or not
for f in "$RELAYS" "$PARTIAL" "$PIDS" "$UP_PID"; do
  if [ -f "$f" ]; then state=1; fi
done

# An up.sh still starting the testnet: SIGTERM makes it stop the relays it
# started and exit (bounded: its own SIGTERM/SIGKILL wait, plus a margin).
up="$(running_up)"
if [ -n "$up" ]; then
  echo "stopping testnet/up.sh (pid $up), which is still starting the testnet" >&2
  kill -TERM "$up" 2>/dev/null || true
  deadline=$((SECONDS + STOP_GRACE + 10))
  while pid_alive "$up" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
  if pid_alive "$up"; then
    echo "testnet/up.sh (pid $up) still runs; stopping its relays anyway" >&2
  fi
fi

pids="$(testnet_relays | tr '\n' ' ')"
pids="${pids% }"
if [ "$state" = 0 ] && [ -z "$pids" ]; then
  echo "no testnet in $RUN_DIR" >&2
else
  if [ ! -f "$RELAYS" ]; then
    if [ -n "$pids" ]; then
      echo "no complete testnet in $RUN_DIR: stopping the relays an unfinished up.sh left (pids $pids)" >&2
    else
      echo "no complete testnet in $RUN_DIR: removing what an unfinished up.sh left" >&2
    fi
  fi
  # shellcheck disable=SC2086
  stop_pids "$STOP_GRACE" $pids || status=1
  rm -f "$RELAYS" "$PARTIAL" "$PIDS"
  if [ -z "$(running_up)" ]; then rm -f "$UP_PID"; fi
  if [ "$status" = 0 ]; then
    echo "testnet stopped"
  else
    echo "testnet stopped, but some relays survived SIGKILL" >&2
  fi
fi
if [ "$clean" = 1 ]; then
  rm -rf "$RUN_DIR"
fi
exit "$status"
