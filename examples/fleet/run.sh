#!/usr/bin/env bash
# A fleet on loopback: etcd (Debian's etcd-server) on 127.0.0.1:2379, the
# config in examples/fleet/weir.toml published to it, and two weir nodes
# serving it on 127.0.0.1:8443 (node a) and :8444 (node b), in front of two
# demo TLS servers. Ctrl-C stops it all.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
source scripts/demo.sh
demo_build
if ! command -v etcd >/dev/null || ! command -v etcdctl >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server etcd-client
    else
        echo "the example needs etcd: apt-get install etcd-server etcd-client" >&2
        exit 1
    fi
fi

run="$root/examples/fleet/run"
demo_upstreams "$run" \
    --serve "app-1:app.localhost=127.0.0.1:9101" \
    --serve "app-2:app.localhost=127.0.0.1:9102"
pids=("$demo_pid")
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT

etcd --data-dir "$run/etcd" --listen-client-urls http://127.0.0.1:2379 \
    --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster default=http://127.0.0.1:2380 --logger zap --log-level warn 2>"$run/etcd.log" &
pids+=("$!")
for _ in $(seq 100); do
    etcdctl --endpoints http://127.0.0.1:2379 endpoint health >/dev/null 2>&1 && break
    sleep 0.1
done

weir="$root/target/debug/weir"
"$weir" publish --config examples/fleet/weir.toml --etcd http://127.0.0.1:2379
"$weir" run --config examples/fleet/node-a.toml 2> >(sed 's/^/[a] /' >&2) &
pids+=("$!")
"$weir" run --config examples/fleet/node-b.toml 2> >(sed 's/^/[b] /' >&2) &
pids+=("$!")
sleep 1

cat <<MSG

Two weir nodes serve one configuration from etcd. In another terminal, try:

  # the same route through either node (both pass app.localhost to app-1):
  curl --cacert $run/ca.pem --resolve app.localhost:8443:127.0.0.1 https://app.localhost:8443/
  curl --cacert $run/ca.pem --resolve app.localhost:8444:127.0.0.1 https://app.localhost:8444/

  # which revision each node serves:
  $weir fleet status --etcd http://127.0.0.1:2379

  # add app-2 to the pool through node a's admin API; node b uses it too:
  curl -X POST -H 'content-type: application/json' -d '"127.0.0.1:9102"' http://127.0.0.1:9901/api/pools/app/backends
  curl --cacert $run/ca.pem --resolve app.localhost:8444:127.0.0.1 https://app.localhost:8444/
  curl --cacert $run/ca.pem --resolve app.localhost:8444:127.0.0.1 https://app.localhost:8444/

  # edit examples/fleet/weir.toml (say, a route for another name), then publish and wait for both nodes:
  $weir publish --config $root/examples/fleet/weir.toml --etcd http://127.0.0.1:2379 --wait

  # what is in etcd:
  etcdctl --endpoints http://127.0.0.1:2379 get /weir/ --prefix --keys-only

Both nodes log below ([a], [b]). Ctrl-C stops it all.

MSG
wait
