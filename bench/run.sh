#!/usr/bin/env bash
# The benchmark commands, on loopback, with the same TLS upstream and load
# generator. Each installs what it needs from Debian, builds weir in release
# mode and writes a Markdown report under bench/results/. Needs root
# (packages, sysctls, ulimit).
#
#   bench/run.sh [--terminate | --reencrypt] [--quick] [--defer] [--baseline BIN]
#                                     weir beside HAProxy, nginx stream and a
#                                     direct connection, passing TLS through,
#                                     terminating it, or terminating and
#                                     re-encrypting it to the upstream
#                                     (--quick: fewer repeats, smaller figures;
#                                     --defer: every listener defers accept
#                                     until the client's first bytes;
#                                     --baseline: another weir binary, an
#                                     earlier commit's, measured in the same
#                                     runs as weir-base)
#   bench/run.sh connections          10,000 concurrent passthrough
#                                     connections through one weir
#   bench/run.sh soak [--minutes N] [--compile-every N]
#                                     mixed traffic with a reload every second
#                                     (default 10 minutes; a new component
#                                     every 30th reload)
#   bench/run.sh isolation [--rate N] [--seconds N] [--attacks a,b]
#                                     a bystander tenant's handshakes while
#                                     another tenant attacks: a looping
#                                     plugin, looping shadows, DNS lookups,
#                                     a health-probe storm, a republish loop (default 200
#                                     connections a second)
#   bench/run.sh reload-memory [--weir BIN] [--no-cache]  weir's RSS over failed reloads of the
#                                     18 MB Python example plugin
#   bench/run.sh coldstart            `weir route` and `weir run` start times
#                                     with and without the compiled-code cache
#   bench/run.sh egress [--seconds N]  pgbench through weir's RA-TLS egress
#                                     and sidecar against libpq's own TLS
#   bench/run.sh splice [--quick]     copy against splice(2) for bulk data, on
#                                     loopback and over veth pairs between
#                                     network namespaces it creates
#   bench/run.sh fleet [--publishes N]
#                                     three fleet nodes on one etcd: publish to
#                                     applied, storage, a new component
#   bench/run.sh fleet-scale [--nodes 10,50,200] [--publishes N] [--outage S] [--weir BIN]
#                                     N fleet nodes on one etcd: publish to the
#                                     last node serving, etcd events, bytes and
#                                     CPU per publish, node memory
set -euo pipefail
cd "$(dirname "$0")/.."
mode=compare
case "${1:-}" in
    connections | soak | isolation | reload-memory | coldstart | fleet | fleet-scale | egress | splice) mode="$1"; shift ;;
esac

if [ "$(id -u)" != 0 ]; then
    echo "bench/run.sh installs packages and raises limits: run it as root" >&2
    exit 1
fi
need=()
if [ "$mode" = compare ] || [ "$mode" = splice ]; then
    command -v haproxy >/dev/null || need+=(haproxy)
    command -v nginx >/dev/null || need+=(nginx)
    [ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(libnginx-mod-stream)
fi
command -v taskset >/dev/null || need+=(util-linux)
if [ "$mode" = splice ]; then
    command -v ethtool >/dev/null || need+=(ethtool)
    command -v ip >/dev/null || need+=(iproute2)
fi
if [ "$mode" = fleet ] || [ "$mode" = fleet-scale ]; then
    command -v etcd >/dev/null || need+=(etcd-server)
    command -v etcdctl >/dev/null || need+=(etcd-client)
fi
if [ "$mode" = egress ]; then
    command -v pgbench >/dev/null || need+=(postgresql-client-15)
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql-15)
fi
command -v protoc >/dev/null || need+=(protobuf-compiler)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
# The packaged services are not wanted: each proxy is started by the benchmark.
systemctl stop haproxy nginx 2>/dev/null || true
pkill -x haproxy 2>/dev/null || true
pkill -x nginx 2>/dev/null || true

# Tens of thousands of loopback connections: reuse TIME_WAIT ports, widen the
# ephemeral range, allow as many descriptors as the machine lets us.
sysctl -qw net.ipv4.tcp_tw_reuse=1 net.ipv4.ip_local_port_range="16384 65000" || true
ulimit -n 200000 2>/dev/null || ulimit -n "$(ulimit -Hn)"

scripts/build-plugins.sh
cargo build --locked --release -p weir -p weir-bench -p demo-upstream
case "$mode" in
    compare) exec python3 bench/run.py "$@" ;;
    connections) exec python3 bench/connections.py "$@" ;;
    soak) exec python3 bench/soak.py "$@" ;;
    isolation) exec python3 bench/isolation.py "$@" ;;
    reload-memory) exec python3 bench/reload_memory.py "$@" ;;
    coldstart) exec python3 bench/coldstart.py "$@" ;;
    fleet) exec python3 bench/fleet.py "$@" ;;
    fleet-scale) exec python3 bench/fleet_scale.py "$@" ;;
    egress) exec python3 bench/egress.py "$@" ;;
    splice) exec python3 bench/splice.py "$@" ;;
esac
