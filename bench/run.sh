#!/usr/bin/env bash
# The benchmark command: weir beside HAProxy, nginx stream and a direct
# connection, on loopback, with the same TLS upstream. Installs what it needs
# from Debian, builds weir in release mode, runs every workload, and writes a
# Markdown report under bench/results/. Needs root (packages, sysctls, ulimit).
#
#   bench/run.sh [--quick]      (--quick: fewer repeats and smaller figures)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "bench/run.sh installs packages and raises limits: run it as root" >&2
    exit 1
fi
need=()
command -v haproxy >/dev/null || need+=(haproxy)
command -v nginx >/dev/null || need+=(nginx)
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(libnginx-mod-stream)
command -v taskset >/dev/null || need+=(util-linux)
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
cargo build --locked --release -p weir -p weir-bench
exec python3 bench/run.py "$@"
