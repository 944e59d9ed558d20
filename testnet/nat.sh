#!/usr/bin/env bash
# A mesh with relays behind NAT, in network namespaces (needs root, ip and
# nft). Nothing is created outside the namespaces it makes (all named mwn-*).
#
#   sudo testnet/nat.sh up       # build the topology, start the relays, wait until anchored
#   sudo testnet/nat.sh status   # each relay: reachability, anchors, peers
#   sudo testnet/nat.sh down     # stop the relays, delete the namespaces
#   sudo testnet/nat.sh exec a-cli meshwhisper id new ...   # run a command in a namespace
#                                 (`meshwhisper` there is the binary the relays run)
#
# Topology ("internet" 203.0.113.0/24 on a bridge; TEST-NET-3, never routed):
#
#   pub1 203.0.113.10   pub2 .11   pub3 .12          public relays
#   rta  wan .2  | lan 10.0.1.0/24: a (relay) .2, a-cli .3    site A: NAT
#   rtb  wan .3  | lan 10.0.2.0/24: b (relay) .2, b-cli .3    site B: NAT
#   rtc  wan .4  | lan 10.0.3.0/24: c (relay) .2, c-cli .3    site C: NAT, egress only to pub1
#
# Routers masquerade their LAN, forward only what the LAN started, and drop
# (never answer) unsolicited packets to themselves: the behaviour of common
# home routers, and what hole punching needs (libp2p-notes §7). Site C's
# router also drops everything the LAN sends anywhere but pub1 (its uplink),
# and relay c runs `--transit-only`: it sends everything for other relays
# through pub1.
#
# Every relay listens on TCP and QUIC port 4001 and HTTP 8080 inside its
# namespace. The site relays start with `--reachability auto` (AutoNAT v2
# finds them private); the public relays are declared `--reachability
# public` (MW_NAT_PUBLIC=auto lets AutoNAT find that out too). Relays
# bootstrap from pub1. `up` waits (up to MW_NAT_WAIT seconds, default 120)
# until the public relays say public, relays a and b say anchored and c
# (transit-only) has its uplink.
#
# Binary: $MW_BIN, else target/release/meshwhisper (built when missing).
# Run directory: $MW_NAT_DIR, default target/testnet-nat: relays.tsv (name,
# namespace, pid, PeerId, libp2p address, HTTP base) and one directory per
# relay with its data, stdout.log and stderr.log.
# Transports: MW_NAT_TRANSPORTS=tcp|quic|both (default both).
# MW_NAT_MGMT=1 adds a management network to the relays' HTTP gateways
# (namespace mwn-mgmt, 172.31.0.0/24: pub1 .10, pub2 .11, pub3 .12, a .2,
# b .3, c .4), for benchmarks.
# Extra relay flags: MW_RELAY_ARGS (all relays), MW_RELAY_ARGS_<name>
# (one relay, e.g. MW_RELAY_ARGS_c="--anchors 1").
set -Eeuo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" # mw_bin
RUN_DIR="${MW_NAT_DIR:-$REPO/target/testnet-nat}"
case "$RUN_DIR" in /*) ;; *) RUN_DIR="$PWD/$RUN_DIR" ;; esac
RELAYS="$RUN_DIR/relays.tsv"
WAIT="${MW_NAT_WAIT:-120}"
P=mwn- # namespace prefix
PUBLIC=(pub1 pub2 pub3)
SITES=(a b c)
ALL_NS=(inet pub1 pub2 pub3 rta rtb rtc a b c a-cli b-cli c-cli mgmt)

die() {
  echo "testnet/nat.sh: $*" >&2
  exit 1
}

usage() {
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

need_root() {
  [ "$(id -u)" = 0 ] || die "needs root (network namespaces): run it with sudo"
  command -v ip >/dev/null || die "needs ip (iproute2)"
  command -v nft >/dev/null || die "needs nft: apt-get install -y nftables"
  command -v curl >/dev/null || die "needs curl"
}

ns() { ip netns exec "$P$1" "${@:2}"; }

ns_exists() { ip netns list 2>/dev/null | grep -qE "^$P$1( |$)"; }


# veth pair: $1 namespace, $2 its interface name, $3 peer namespace, $4 peer interface
link() {
  ip link add "tmp$$a" type veth peer name "tmp$$b"
  ip link set "tmp$$a" netns "$P$1"
  ip link set "tmp$$b" netns "$P$3"
  ns "$1" ip link set "tmp$$a" name "$2"
  ns "$3" ip link set "tmp$$b" name "$4"
  ns "$1" ip link set "$2" up
  ns "$3" ip link set "$4" up
}

# router: name, wan ip, lan prefix (10.0.N), [only destination]
router() {
  local r="rt$1" wan="$2" lan="$3" only="${4:-}"
  link inet "to-$r" "$r" wan
  ns inet ip link set "to-$r" master br0
  ns "$r" ip addr add "$wan/24" dev wan
  ns "$r" sysctl -qw net.ipv4.ip_forward=1
  ns "$r" nft -f - <<EOF
table ip nat {
  chain postrouting {
    type nat hook postrouting priority 100;
    ip saddr $lan.0/24 oifname "wan" masquerade
  }
}
table ip filter {
  chain forward {
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
    iifname "lan" ${only:+ip daddr != $only ip daddr != $lan.0/24 drop}
    iifname "lan" accept
  }
  chain input {
    type filter hook input priority 0; policy accept;
    iifname "wan" ct state new drop
  }
}
EOF
  local host
  for host in "$1" "$1-cli"; do
    ip netns add "$P$host"
    ns "$host" ip link set lo up
  done
  # The LAN: a bridge in the router with the relay host and a client host.
  ns "$r" ip link add lan type bridge
  ns "$r" ip addr add "$lan.1/24" dev lan
  ns "$r" ip link set lan up
  link "$1" eth0 "$r" "p-$1"
  ns "$r" ip link set "p-$1" master lan
  link "$1-cli" eth0 "$r" "p-$1-cli"
  ns "$r" ip link set "p-$1-cli" master lan
  ns "$1" ip addr add "$lan.2/24" dev eth0
  ns "$1" ip route add default via "$lan.1"
  ns "$1-cli" ip addr add "$lan.3/24" dev eth0
  ns "$1-cli" ip route add default via "$lan.1"
}

build_topology() {
  local n
  for n in inet pub1 pub2 pub3 rta rtb rtc; do
    ip netns add "$P$n"
    ns "$n" ip link set lo up
  done
  ns inet ip link add br0 type bridge
  ns inet ip link set br0 up
  local i=10
  for n in "${PUBLIC[@]}"; do
    link inet "to-$n" "$n" eth0
    ns inet ip link set "to-$n" master br0
    ns "$n" ip addr add "203.0.113.$i/24" dev eth0
    i=$((i + 1))
  done
  router a 203.0.113.2 10.0.1
  router b 203.0.113.3 10.0.2
  router c 203.0.113.4 10.0.3 203.0.113.10
  if [ "${MW_NAT_MGMT:-0}" = 1 ]; then management; fi
}

# MW_NAT_MGMT=1: a management network (172.31.0.0/24, no routes beyond it)
# from namespace mwn-mgmt to every relay's HTTP gateway, for load
# generators that must reach relays in different sites at once. Relays
# listen for libp2p on their own address only, so federation never uses it.
management() {
  ip netns add "${P}mgmt"
  ns mgmt ip link set lo up
  ns mgmt ip link add mbr type bridge
  ns mgmt ip addr add 172.31.0.1/24 dev mbr
  ns mgmt ip link set mbr up
  local n i
  for n in pub1 pub2 pub3 a b c; do
    i="$(mgmt_ip "$n")"
    link "$n" mgmt mgmt "m-$n"
    ns mgmt ip link set "m-$n" master mbr
    ns "$n" ip addr add "$i/24" dev mgmt
  done
}

mgmt_ip() {
  case "$1" in
    pub1) echo 172.31.0.10 ;; pub2) echo 172.31.0.11 ;; pub3) echo 172.31.0.12 ;;
    a) echo 172.31.0.2 ;; b) echo 172.31.0.3 ;; c) echo 172.31.0.4 ;;
  esac
}

ip_of() {
  case "$1" in
    pub1) echo 203.0.113.10 ;; pub2) echo 203.0.113.11 ;; pub3) echo 203.0.113.12 ;;
    a) echo 10.0.1.2 ;; b) echo 10.0.2.2 ;; c) echo 10.0.3.2 ;;
  esac
}

# start_relay name bootstrap: starts it in its namespace; sets R_PEER
start_relay() {
  local name="$1" boot="$2" dir="$RUN_DIR/$1" ip
  ip="$(ip_of "$name")"
  mkdir -p "$dir"
  : >"$dir/stdout.log"
  : >"$dir/stderr.log"
  # libp2p on the host's own address only (so a relay's record names no
  # loopback address, and nothing of the management network); HTTP on all.
  local args=(relay --data-dir "$dir/data" --http "0.0.0.0:8080")
  case "${MW_NAT_TRANSPORTS:-both}" in
    tcp) args+=(--listen "/ip4/$ip/tcp/4001") ;;
    quic) args+=(--listen "/ip4/$ip/udp/4001/quic-v1") ;;
    *) args+=(--listen "/ip4/$ip/tcp/4001" --listen "/ip4/$ip/udp/4001/quic-v1") ;;
  esac
  if [ -n "$boot" ]; then args+=(--bootstrap "$boot"); fi
  case "$name" in
    pub*) if [ "${MW_NAT_PUBLIC:-public}" = public ]; then args+=(--reachability public); fi ;;
    c) args+=(--transit-only) ;; # it may reach only pub1: it never dials anyone else
  esac
  local extra_var="MW_RELAY_ARGS_$name"
  # shellcheck disable=SC2086
  RUST_LOG="${RUST_LOG:-info}" ip netns exec "$P$name" "$BIN" "${args[@]}" ${MW_RELAY_ARGS:-} ${!extra_var:-} \
    </dev/null >>"$dir/stdout.log" 2>>"$dir/stderr.log" &
  local pid=$!
  local deadline=$((SECONDS + 30))
  R_PEER=""
  while [ -z "$R_PEER" ]; do
    R_PEER="$(sed -n 's/^peer_id=\([^[:space:]]*\).*/\1/p' "$dir/stdout.log" | head -n1)"
    kill -0 "$pid" 2>/dev/null || die "relay $name exited at start; see $dir/stderr.log"
    [ "$SECONDS" -lt "$deadline" ] || die "relay $name printed no peer_id in 30 s; see $dir/stderr.log"
    sleep 0.1
  done
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$P$name" "$pid" "$R_PEER" \
    "$(addr_of "$name" "$R_PEER")" "http://$ip:8080" >>"$RELAYS.tmp"
}

addr_of() { # name peer: its libp2p address, first transport
  if [ "${MW_NAT_TRANSPORTS:-both}" = quic ]; then
    echo "/ip4/$(ip_of "$1")/udp/4001/quic-v1/p2p/$2"
  else
    echo "/ip4/$(ip_of "$1")/tcp/4001/p2p/$2"
  fi
}

health() { # name
  ns "$1" curl -fsS --max-time 2 "http://$(ip_of "$1"):8080/health" 2>/dev/null || true
}

# One value of /health's "nat" object (flat strings only), no jq needed.
nat_field() { # json key
  sed -n "s/.*\"nat\":{[^}]*\"$2\":\"\([^\"]*\)\".*/\1/p" <<<"$1" | head -n1
}

cmd_up() {
  need_root
  if ns_exists inet || [ -f "$RELAYS" ]; then
    die "a NAT testnet is already up (testnet/nat.sh down removes it)"
  fi
  BIN="$(mw_bin)"
  [ -x "$BIN" ] || die "no relay binary at $BIN"
  BIN="$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")"
  rm -rf "$RUN_DIR"
  mkdir -p "$RUN_DIR"
  trap 'echo "testnet/nat.sh up failed; removing what it made" >&2; cmd_down >/dev/null 2>&1 || true' ERR
  trap 'cmd_down >/dev/null 2>&1 || true; exit 130' INT TERM
  build_topology
  start_relay pub1 ""
  local boot n
  boot="$(addr_of pub1 "$R_PEER")"
  for n in pub2 pub3 a b c; do
    start_relay "$n" "$boot"
  done
  mv "$RELAYS.tmp" "$RELAYS"
  local deadline=$((SECONDS + WAIT)) pending h
  while :; do
    pending=""
    for n in "${PUBLIC[@]}"; do
      h="$(health "$n")"
      [ "$(nat_field "$h" state)" = public ] || pending="$pending $n"
    done
    for n in "${SITES[@]}"; do
      h="$(health "$n")"
      case "$n:$(nat_field "$h" state)" in
        c:transit-only) grep -q '"federationPeersConnected":[1-9]' <<<"$h" || pending="$pending $n" ;;
        *:anchored) ;;
        *) pending="$pending $n" ;;
      esac
    done
    [ -z "$pending" ] && break
    if [ "$SECONDS" -ge "$deadline" ]; then
      cmd_status >&2 || true
      false # the ERR trap tears down
      die "not ready within $WAIT s:$pending"
    fi
    sleep 0.5
  done
  trap - ERR INT TERM
  cmd_status
}

cmd_status() {
  [ -f "$RELAYS" ] || die "no NAT testnet is up (testnet/nat.sh up starts one)"
  printf '%-5s %-9s %-8s %-13s %-8s %s\n' relay ns pid state anchors peer_id
  local name nsname pid peer addr http h anchors state bad=0
  while IFS=$'\t' read -r name nsname pid peer addr http; do
    h="$(health "$name")"
    state="$(nat_field "$h" state)"
    anchors="$(sed -n 's/.*"anchors":\[\([^]]*\)\].*/\1/p' <<<"$h" | tr -cd ',' | wc -c)"
    if [ -n "$(sed -n 's/.*"anchors":\[\("[^]]*\)\].*/\1/p' <<<"$h")" ]; then
      anchors=$((anchors + 1))
    fi
    if [ -z "$h" ]; then state=down bad=1; fi
    printf '%-5s %-9s %-8s %-13s %-8s %s\n' "$name" "$nsname" "$pid" "${state:-?}" "$anchors" "$peer"
  done <"$RELAYS"
  echo "libp2p and HTTP addresses: $RELAYS; run a command in a site with: testnet/nat.sh exec a-cli <command>"
  return "$bad"
}

cmd_down() {
  [ "$(id -u)" = 0 ] || die "needs root: run it with sudo"
  local f name nsname pid rest
  for f in "$RELAYS" "$RELAYS.tmp"; do
    [ -f "$f" ] || continue
    while IFS=$'\t' read -r name nsname pid rest; do
      kill -TERM "$pid" 2>/dev/null || true
    done <"$f"
  done
  # Anything still running in our namespaces (relays, clients) goes too.
  local n deadline=$((SECONDS + 10))
  for n in "${ALL_NS[@]}"; do
    if ns_exists "$n"; then
      ip netns pids "$P$n" 2>/dev/null | xargs -r kill -TERM 2>/dev/null || true
    fi
  done
  while [ "$SECONDS" -lt "$deadline" ]; do
    local left=""
    for n in "${ALL_NS[@]}"; do
      if ns_exists "$n" && [ -n "$(ip netns pids "$P$n" 2>/dev/null)" ]; then left=1; fi
    done
    [ -z "$left" ] && break
    sleep 0.2
  done
  for n in "${ALL_NS[@]}"; do
    if ns_exists "$n"; then
      ip netns pids "$P$n" 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
      ip netns del "$P$n"
    fi
  done
  rm -f "$RELAYS" "$RELAYS.tmp"
  echo "NAT testnet down; logs are in $RUN_DIR"
}

cmd_exec() {
  [ "$(id -u)" = 0 ] || die "needs root: run it with sudo"
  [ $# -ge 2 ] || usage
  ns_exists "$1" || die "no namespace $P$1 (is the NAT testnet up?)"
  # `meshwhisper` is the binary the testnet runs (sudo drops PATH).
  if [ "$2" = meshwhisper ]; then
    set -- "$1" "$(mw_bin)" "${@:3}"
  fi
  ip netns exec "$P$1" "${@:2}"
}

case "${1:-}" in
  up) cmd_up ;;
  status) cmd_status ;;
  down) cmd_down ;;
  exec) shift; cmd_exec "$@" ;;
  *) usage ;;
esac
