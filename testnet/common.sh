# Shared by up.sh, status.sh and down.sh (sourced, not run).
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DIR="${MW_TESTNET_DIR:-$REPO/target/testnet}"
RELAYS="$RUN_DIR/relays.tsv"

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
