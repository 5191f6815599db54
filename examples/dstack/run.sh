#!/usr/bin/env bash
# Runs weir as a dstack gateway (examples/dstack/weir.toml) in front of demo
# apps: TLS servers on 127.0.0.1:9443 and :9444 with their own certificates
# and a plaintext one on 127.0.0.1:9080. Ctrl-C stops it all.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
source scripts/demo.sh
demo_build

run="$root/examples/dstack/run"
demo_upstreams "$run" \
    --serve "app:dstack.localhost=127.0.0.1:9443" \
    --serve "shop:shop.localhost=127.0.0.1:9444" \
    --plain "app-http=127.0.0.1:9080" \
    --certificate "wildcard=*.dstack.localhost"

app=3327603e03f5bd1f830812ca4a789277fc31f577
target/debug/weir check --config examples/dstack/weir.toml
cat <<MSG

weir (as a dstack gateway) is starting on 127.0.0.1:8443. In another terminal, try:

  # <app>-<port>s: passthrough; the certificate is the app's own ("app"):
  curl --cacert $run/ca.pem --resolve $app-9443s.dstack.localhost:8443:127.0.0.1 https://$app-9443s.dstack.localhost:8443/

  # <app>-<port>: terminated by weir with the wildcard certificate ("wildcard (weir)"), plain to the app:
  curl -v --cacert $run/ca.pem --resolve $app-9080.dstack.localhost:8443:127.0.0.1 https://$app-9080.dstack.localhost:8443/ 2>&1 | grep -E "subject|hello"

  # a custom domain, passed through to the app's port 9444:
  curl --cacert $run/ca.pem --resolve shop.localhost:8443:127.0.0.1 https://shop.localhost:8443/

  # sg is not a thing: refused, and the log says why:
  curl --cacert $run/ca.pem --resolve $app-9443sg.dstack.localhost:8443:127.0.0.1 https://$app-9443sg.dstack.localhost:8443/

  # what the plugin decides for any name, without a socket:
  $root/target/debug/weir route --config $root/examples/dstack/weir.toml --listener public --sni $app-50051g.dstack.localhost

Each connection is logged below. Ctrl-C stops weir and the demo apps.

MSG
target/debug/weir run --config examples/dstack/weir.toml
