# Shared by up.sh, status.sh and down.sh (sourced, not run).
# shellcheck shell=bash
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DIR="${MW_TESTNET_DIR:-$REPO/target/testnet}"
# One spelling of the run directory for every script (absolute, no trailing
# slash): relays are recognised by the --data-dir it puts in their command line.
case "$RUN_DIR" in /*) ;; *) RUN_DIR="$PWD/$RUN_DIR" ;; esac
while [ "${#RUN_DIR}" -gt 1 ] && [ "${RUN_DIR%/}" != "$RUN_DIR" ]; do
  RUN_DIR="${RUN_DIR%/}"
done
# The relay table (index, pid, PeerId, HTTP base, libp2p address; tab
# separated), written by up.sh once every relay is up.
RELAYS="$RUN_DIR/relays.tsv"
# While up.sh runs: the rows of the relays started so far (renamed to
# $RELAYS at the end), every started relay's "index<TAB>pid" (written as
# soon as it is started) and the pid of the up.sh itself.
PARTIAL="$RUN_DIR/relays.tsv.tmp"
PIDS="$RUN_DIR/relays.pids"
UP_PID="$RUN_DIR/up.pid"

# The relay binary: $MW_BIN, else the release build (built when missing).
mw_bin() {
  if [ -n "${MW_BIN:-}" ]; then
    echo "$MW_BIN"
    return
  fi
  local bin="$REPO/target/release/meshwhisper"
  if [ ! -x "$bin" ]; then
    echo "building $bin ..." >&2
    (cd "$REPO" && cargo build --release --locked -p meshwhisper >&2) || return 1
  fi
  echo "$bin"
}

# One field of a flat JSON object (numbers, strings, booleans), no jq needed.
json_field() {
  sed -n "s/.*\"$2\":\"\{0,1\}\([^,\"}]*\).*/\1/p" <<<"$1" | head -n1
}

# The command line of process $1 (empty when there is none).
proc_args() {
  ps -ww -o args= -p "$1" 2>/dev/null || true
}

# Whether process $1 runs (a zombie, dead but not yet reaped, does not).
pid_alive() {
  kill -0 "$1" 2>/dev/null || return 1
  local st
  st="$(ps -o stat= -p "$1" 2>/dev/null || true)"
  case "$st" in
    Z*) return 1 ;;
    *) return 0 ;; # also when ps cannot tell: better wait than lose a relay
  esac
}

# Whether process $1 is the relay with index $2 of a testnet (its data
# directory is .../relay-$2/data).
is_testnet_relay() {
  case "$(proc_args "$1")" in
    *"--data-dir "*"/relay-$2/data"*) return 0 ;;
    *) return 1 ;;
  esac
}

# Pids of running relays whose data directory is in $RUN_DIR, recorded or
# not (one a line).
run_dir_relays() {
  local pid args
  { ps -eww -o pid=,args= 2>/dev/null || true; } | while read -r pid args; do
    case "$args" in
      *"--data-dir $RUN_DIR/relay-"[0-9]*) echo "$pid" ;;
    esac
  done
}

# Pids of every running relay of this run directory: those the relay table,
# the partial table or the pid file record (checked to still be that relay,
# not a reused pid) and those found by their data directory. One a line.
testnet_relays() {
  local f i pid rest
  {
    for f in "$RELAYS" "$PARTIAL" "$PIDS"; do
      [ -f "$f" ] || continue
      while IFS=$'\t' read -r i pid rest; do
        if [[ "$i" =~ ^[0-9]+$ ]] && [[ "$pid" =~ ^[0-9]+$ ]] &&
          pid_alive "$pid" && is_testnet_relay "$pid" "$i"; then
          echo "$pid"
        fi
      done <"$f" 2>/dev/null || true
    done
    run_dir_relays
  } | sort -un
}

# The pid of an up.sh still running for this run directory, if any.
running_up() {
  local pid=""
  if [ -f "$UP_PID" ]; then pid="$(head -n1 "$UP_PID" 2>/dev/null || true)"; fi
  if [[ "$pid" =~ ^[0-9]+$ ]] && [ "$pid" != "$$" ] && pid_alive "$pid"; then
    case "$(proc_args "$pid")" in
      *up.sh*) echo "$pid" ;;
    esac
  fi
}

# stop_pids GRACE PID...: SIGTERM, then SIGKILL for those still running
# after GRACE seconds; waits (bounded) until they are gone. Returns 1 when
# some survive even that.
stop_pids() {
  local grace="$1" p alive deadline
  shift
  [ "$#" -gt 0 ] || return 0
  kill -TERM "$@" 2>/dev/null || true
  deadline=$((SECONDS + grace))
  while :; do
    alive=""
    for p in "$@"; do
      if pid_alive "$p"; then alive="$alive $p"; fi
    done
    if [ -z "$alive" ]; then return 0; fi
    if [ "$SECONDS" -ge "$deadline" ]; then break; fi
    sleep 0.1
  done
  echo "still running after ${grace} s, sending SIGKILL to:$alive" >&2
  # shellcheck disable=SC2086
  kill -KILL $alive 2>/dev/null || true
  deadline=$((SECONDS + 5))
  while :; do
    alive=""
    for p in "$@"; do
      if pid_alive "$p"; then alive="$alive $p"; fi
    done
    if [ -z "$alive" ]; then return 0; fi
    if [ "$SECONDS" -ge "$deadline" ]; then break; fi
    sleep 0.1
  done
  echo "could not stop:$alive" >&2
  return 1
}
