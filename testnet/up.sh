#!/usr/bin/env bash
# Starts N federated relays on loopback: relay 0 is everyone's bootstrap.
# Free ports are chosen by the relays themselves; data, logs and the relay
# table live under $MW_TESTNET_DIR (default target/testnet).
#
#   testnet/up.sh 5                  # five relays
#   MW_RELAY_ARGS="--log debug" testnet/up.sh 3
#
# Prints one line per relay: index, PeerId, HTTP base, libp2p address.
# On any failure (a relay that exits or does not start, an error, SIGINT,
# SIGTERM, SIGHUP) it stops every relay it started and removes the partial
# relay table; the logs stay in relay-N/.
set -Eeuo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"

START_TIMEOUT=30 # seconds for one relay to print its addresses
FEDERATE_TIMEOUT=30 # seconds for every relay to have a federated peer
STOP_GRACE=10 # seconds between SIGTERM and SIGKILL

N="${1:-3}"
if ! [[ "$N" =~ ^[0-9]+$ ]] || [ "$N" -lt 1 ]; then
  echo "usage: $0 N   (N >= 1 relays)" >&2
  exit 2
fi
if [ -f "$RELAYS" ]; then
  echo "a testnet is already up in $RUN_DIR (testnet/down.sh stops it)" >&2
  exit 1
fi
BIN="$(mw_bin)"
if ! command -v "$BIN" >/dev/null 2>&1; then
  echo "no relay binary at $BIN" >&2
  exit 1
fi
mkdir -p "$RUN_DIR"

# One up.sh per run directory: up.pid is created exclusively.
take_lock() { (set -C && echo "$$" >"$UP_PID") 2>/dev/null; }
if ! take_lock; then
  sleep 0.2 # an up.sh that has just created up.pid may not have written it yet
  other="$(running_up)"
  if [ -n "$other" ]; then
    echo "an up.sh (pid $other) is already starting a testnet in $RUN_DIR (testnet/down.sh stops it)" >&2
    exit 1
  fi
  rm -f "$UP_PID" # left by an up.sh that is gone
  if ! take_lock; then
    echo "another up.sh is starting a testnet in $RUN_DIR" >&2
    exit 1
  fi
fi
trap 'rm -f "$UP_PID"' EXIT # until on_exit takes over
# Relays left running by an up.sh that did not finish (killed with SIGKILL)?
leftover="$(testnet_relays | tr '\n' ' ')"
if [ -f "$RELAYS" ] || [ -n "$leftover" ]; then
  if [ -f "$RELAYS" ]; then
    echo "a testnet is already up in $RUN_DIR (testnet/down.sh stops it)" >&2
  else
    echo "relays of an unfinished up.sh still run in $RUN_DIR (pids ${leftover% }); testnet/down.sh stops them" >&2
  fi
  exit 1
fi
STARTED=""    # pids of the relays started so far
CURRENT=""    # the relay being started
STAGE="starting"
FAIL_MSG=""
SUCCESS=0

fail() { # message: stop here; on_exit stops what was started
  FAIL_MSG="$1"
  exit 1
}

on_err() { # status line
  if [ -z "$FAIL_MSG" ]; then
    FAIL_MSG="command failed with status $1 at up.sh line $2: $BASH_COMMAND"
  fi
}

on_signal() { # name status
  trap '' INT TERM HUP
  FAIL_MSG="interrupted by SIG$1"
  if [ -n "$CURRENT" ]; then FAIL_MSG="$FAIL_MSG while starting relay $CURRENT"; fi
  if [ "$STAGE" = federating ]; then FAIL_MSG="$FAIL_MSG while waiting for federation"; fi
  CURRENT="" # no relay of ours failed: no log to show
  exit "$2"
}

on_exit() {
  local status=$?
  trap '' INT TERM HUP
  trap - ERR
  set +e
  if [ "$SUCCESS" = 1 ]; then
    rm -f "$PIDS" "$UP_PID"
    return
  fi
  if [ "$status" = 0 ]; then status=1; fi
  echo "testnet/up.sh failed: ${FAIL_MSG:-exit status $status}" >&2
  if [ -n "$CURRENT" ] && [ -s "$RUN_DIR/relay-$CURRENT/stderr.log" ]; then
    echo "--- last lines of $RUN_DIR/relay-$CURRENT/stderr.log:" >&2
    tail -n 20 "$RUN_DIR/relay-$CURRENT/stderr.log" >&2
    echo "---" >&2
  fi
  # Everything this up.sh started: the relays recorded, the last one started
  # (in case the signal came before it was recorded) and any relay of this
  # run directory.
  local pids p all
  all="$STARTED ${!:-} $(run_dir_relays | tr '\n' ' ')"
  pids=""
  for p in $all; do
    case " $pids " in *" $p "*) ;; *) pids="$pids $p" ;; esac
  done
  disown -a 2>/dev/null # no "Killed" job reports
  if [ -n "$pids" ]; then
    echo "stopping the relays started (pids${pids})" >&2
    # shellcheck disable=SC2086
    stop_pids "$STOP_GRACE" $pids
  fi
  rm -f "$PARTIAL" "$PIDS" "$UP_PID"
  echo "stopped; logs are in $RUN_DIR/relay-N/" >&2
  exit "$status"
}

trap 'on_err $? $LINENO' ERR
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM
trap 'on_signal HUP 129' HUP
trap on_exit EXIT

# Left by an up.sh that was killed, but none of their relays runs.
rm -f "$PARTIAL" "$PIDS"
: >"$PARTIAL"
: >"$PIDS"

# The first value of each peer_id=, http= and listen= line a relay printed
# (complete lines only; other lines and their order do not matter) into
# R_PEER, R_HTTP and R_LISTEN.
read_addrs() { # stdout.log
  R_PEER="" R_HTTP="" R_LISTEN=""
  local line
  {
    while IFS= read -r line; do
      line="${line%$'\r'}"
      case "$line" in
        peer_id=*) if [ -z "$R_PEER" ]; then R_PEER="${line#peer_id=}"; fi ;;
        http=*) if [ -z "$R_HTTP" ]; then R_HTTP="${line#http=}"; fi ;;
        listen=*) if [ -z "$R_LISTEN" ]; then R_LISTEN="${line#listen=}"; fi ;;
      esac
    done <"$1"
  } 2>/dev/null || true
  # A value is one word (anything after it is commentary).
  R_PEER="${R_PEER%%[[:space:]]*}"
  R_HTTP="${R_HTTP%%[[:space:]]*}"
  R_LISTEN="${R_LISTEN%%[[:space:]]*}"
  if [ -z "$R_PEER" ] && [[ "$R_LISTEN" == */p2p/* ]]; then
    R_PEER="${R_LISTEN##*/p2p/}"
  fi
}

start_relay() { # index bootstrap
  local i="$1" boot="$2" dir="$RUN_DIR/relay-$1" pid status deadline
  CURRENT="$i"
  mkdir -p "$dir"
  # The logs exist (and are empty) before the relay starts.
  : >"$dir/stdout.log"
  : >"$dir/stderr.log"
  local args=(relay --data-dir "$dir/data" --http 127.0.0.1:0 --listen /ip4/127.0.0.1/tcp/0)
  if [ -n "$boot" ]; then args+=(--bootstrap "$boot"); fi
  # shellcheck disable=SC2086
  "$BIN" "${args[@]}" ${MW_RELAY_ARGS:-} </dev/null >>"$dir/stdout.log" 2>>"$dir/stderr.log" &
  pid=$!
  STARTED="$STARTED $pid"
  printf '%s\t%s\n' "$i" "$pid" >>"$PIDS"
  # The relay prints its addresses once it listens (bounded wait).
  deadline=$((SECONDS + START_TIMEOUT))
  while :; do
    read_addrs "$dir/stdout.log"
    if [ -n "$R_HTTP" ] && [ -n "$R_LISTEN" ] && [ -n "$R_PEER" ]; then break; fi
    if ! pid_alive "$pid"; then
      status=0
      wait "$pid" 2>/dev/null || status=$?
      fail "relay $i (pid $pid) exited during start-up with status $status; see $dir/stderr.log"
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      fail "relay $i (pid $pid) did not print its addresses within $START_TIMEOUT s; see $dir/stderr.log"
    fi
    sleep 0.1
  done
  if ! pid_alive "$pid"; then
    fail "relay $i (pid $pid) exited right after start-up; see $dir/stderr.log"
  fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$i" "$pid" "$R_PEER" "$R_HTTP" "$R_LISTEN" >>"$PARTIAL"
  CURRENT=""
}

start_relay 0 ""
BOOT="$R_LISTEN"
for i in $(seq 1 $((N - 1))); do
  start_relay "$i" "$BOOT"
done

# Wait (bounded) until every relay has federated with at least one other.
STAGE=federating
if [ "$N" -gt 1 ]; then
  deadline=$((SECONDS + FEDERATE_TIMEOUT))
  while :; do
    ok=1
    while IFS=$'\t' read -r i pid _ http _; do
      if ! pid_alive "$pid"; then
        CURRENT="$i"
        fail "relay $i (pid $pid) exited; see $RUN_DIR/relay-$i/stderr.log"
      fi
      h="$(curl -fsS --max-time 2 "${http%/}/health" 2>/dev/null || true)"
      peers="$(json_field "$h" federationPeersConnected || true)"
      if ! [[ "$peers" =~ ^[0-9]+$ ]] || [ "$peers" -lt 1 ]; then ok=0; break; fi
    done <"$PARTIAL"
    if [ "$ok" = 1 ] || [ "$SECONDS" -ge "$deadline" ]; then break; fi
    sleep 0.1
  done
  if [ "$ok" != 1 ]; then
    echo "warning: not every relay federated within $FEDERATE_TIMEOUT s (testnet/status.sh shows which)" >&2
  fi
fi
STAGE=finished

mv "$PARTIAL" "$RELAYS"
SUCCESS=1
echo "testnet up: $N relays, run directory $RUN_DIR"
while IFS=$'\t' read -r i _ peer http listen; do
  printf 'relay %s  %s  %s  %s\n' "$i" "$peer" "$http" "$listen"
done <"$RELAYS"
