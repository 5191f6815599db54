#!/usr/bin/env bash
# Sets everything up (the wasm32-wasip2 target, the plugins, the gateway) and
# runs weir on examples/quickstart with demo upstreams it starts itself.
# Ctrl-C stops it all.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

source scripts/demo.sh
demo_build

run="$root/examples/quickstart/run"
demo_upstreams "$run" \
    --serve "app-1:app.localhost=127.0.0.1:9101" \
    --serve "app-2:app.localhost=127.0.0.1:9102" \
    --serve "api:api.localhost=127.0.0.1:9103" \
    --plain "web=127.0.0.1:9104" \
    --certificate "weir=web.localhost,secure.localhost"

target/debug/weir check --config examples/quickstart/weir.toml
cat <<MSG

weir is starting on 127.0.0.1:8443. In another terminal, try:

  # passthrough to the "app" pool (two servers, taken in turn); the certificate
  # curl verifies is the upstream's own, signed by the demo CA:
  curl --cacert $run/ca.pem --resolve app.localhost:8443:127.0.0.1 https://app.localhost:8443/

  # a one-label wildcard route to a single address:
  curl --cacert $run/ca.pem --resolve v1.api.localhost:8443:127.0.0.1 https://v1.api.localhost:8443/

  # the same with openssl, showing the upstream's certificate chain:
  openssl s_client -connect 127.0.0.1:8443 -servername app.localhost -CAfile $run/ca.pem -brief </dev/null

  # terminated by weir (the certificate curl verifies is weir's), then sent on
  # in plaintext to a plain HTTP server:
  curl --cacert $run/ca.pem --resolve web.localhost:8443:127.0.0.1 https://web.localhost:8443/

  # terminated by weir, then re-encrypted to the "app" pool (weir verifies the
  # upstream's certificate against the demo CA):
  echo hello | openssl s_client -connect 127.0.0.1:8443 -servername secure.localhost -CAfile $run/ca.pem -brief -ign_eof

  # a rejected name: the connection is closed before any upstream sees it:
  curl --cacert $run/ca.pem --resolve old.localhost:8443:127.0.0.1 https://old.localhost:8443/

  # the dashboard (routes, pools, plugins, certificates, live): open
  # http://127.0.0.1:9900/ in a browser; the admin API behind it:
  curl -s http://127.0.0.1:9900/api/pools

  # ask the plugin chain without opening a socket:
  $root/target/debug/weir route --config $root/examples/quickstart/weir.toml --listener public --sni app.localhost

Each connection is logged below. Ctrl-C stops weir (once the connections in
progress have ended; press it twice to stop at once) and the demo upstreams.

MSG
target/debug/weir run --config examples/quickstart/weir.toml
