#!/usr/bin/env bash
# Runs weir with Traefik's TCP routers (examples/mesh/dynamic.yml) in front of
# demo servers: two TLS app servers with their own certificates
# (127.0.0.1:9543, :9544) and a plaintext one (127.0.0.1:9580). Ctrl-C stops
# it all.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
source scripts/demo.sh
demo_build

run="$root/examples/mesh/run"
demo_upstreams "$run" \
    --serve "app-1:app.mesh.localhost=127.0.0.1:9543" \
    --serve "app-2:app.mesh.localhost=127.0.0.1:9544" \
    --plain "web=127.0.0.1:9580" \
    --certificate "web=web.mesh.localhost,admin.mesh.localhost"

target/debug/weir check --config examples/mesh/weir.toml
cat <<MSG

weir (with Traefik's TCP routers) is starting on 127.0.0.1:8443. In another terminal, try:

  # router "app" (tls.passthrough): the app servers' own certificates, taken in turn:
  curl --cacert $run/ca.pem --resolve app.mesh.localhost:8443:127.0.0.1 https://app.mesh.localhost:8443/

  # router "web": terminated by weir with its certificate, plain to the web server:
  curl --cacert $run/ca.pem --resolve web.mesh.localhost:8443:127.0.0.1 https://web.mesh.localhost:8443/

  # router "admin" (ClientIP 127.0.0.1/32): this client qualifies:
  curl --cacert $run/ca.pem --resolve admin.mesh.localhost:8443:127.0.0.1 https://admin.mesh.localhost:8443/

  # which router would take a connection, without a socket:
  $root/target/debug/weir route --config $root/examples/mesh/weir.toml --listener websecure --sni admin.mesh.localhost --client-ip 10.1.2.3

Each connection is logged below, with the router's name as its route. Ctrl-C stops weir and the demo servers.

MSG
target/debug/weir run --config examples/mesh/weir.toml
