#!/usr/bin/env bash
# The attested database path with weir at every hop, on loopback:
#
#   psql (sslmode=disable) -> weir egress  127.0.0.1:15432  (egress.toml)
#     -> weir gateway 127.0.0.1:18443  (gateway.toml: dstack-router, passthrough)
#     -> weir sidecar 127.0.0.1:15434  (sidecar.toml: RA-TLS, client-auth attested)
#     -> PostgreSQL   127.0.0.1:15435  (started here, in examples/teesql/run/pg)
#
# The RA-TLS certificates are simulated (demo-upstream --ratls: real quote
# layout and key binding, never verified), so each allowlist says
# require_verified = false. Needs PostgreSQL's server (Debian:
# postgresql-15) and psql. Ctrl-C stops it all.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
source scripts/demo.sh
demo_build
initdb="$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -1)"
[ -n "$initdb" ] || { echo "this example needs PostgreSQL's server: apt-get install postgresql-15" >&2; exit 1; }
command -v psql >/dev/null || { echo "this example needs psql: apt-get install postgresql-client-15" >&2; exit 1; }

run="$root/examples/teesql/run"
app=3327603e03f5bd1f830812ca4a789277fc31f577
# The certificates: the app's (egress) and the sidecar's, simulated RA-TLS
# with these MRTDs; the gateway's wildcard, for the names it would terminate.
demo_upstreams "$run" \
    --plain "app-http=127.0.0.1:19080" \
    --certificate "wildcard=*.dstack.localhost" \
    --ratls "egress=app.teesql.localhost,e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9" \
    --ratls "sidecar=db.teesql.localhost,5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c"

# PostgreSQL, trusting loopback clients; as the postgres user when root.
as_pg=()
if [ "$(id -u)" = 0 ]; then as_pg=(runuser -u postgres --); fi
mkdir -p "$run/pg"
[ "$(id -u)" = 0 ] && chown postgres "$run/pg"
"${as_pg[@]}" "$initdb" -D "$run/pg/data" -U postgres --auth=trust --no-sync >/dev/null
"${as_pg[@]}" "$(dirname "$initdb")/postgres" -D "$run/pg/data" -p 15435 -k "$run/pg" \
    -c listen_addresses=127.0.0.1 -c fsync=off >"$run/pg/log" 2>&1 &
pids=("$demo_pid" $!)
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    psql -X -tA -c "select 1" "host=127.0.0.1 port=15435 user=postgres sslmode=disable" >/dev/null 2>&1 && break
    sleep 0.1
done

for hop in sidecar gateway egress; do
    target/debug/weir check --config examples/teesql/$hop.toml
    target/debug/weir run --config examples/teesql/$hop.toml 2>&1 | sed -u "s/^/[$hop] /" &
    pids+=($!)
done
for port in 15434 18443 15432 15433; do
    for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
done
cat <<MSG

The three hops are up. In another terminal, try:

  # psql speaks plain to the egress; weir carries it, attested, to PostgreSQL:
  psql "host=127.0.0.1 port=15432 user=postgres dbname=postgres sslmode=disable" -c "select 'through three weirs'"

  # the same database, weir asking the sidecar with an SSLRequest first:
  psql "host=127.0.0.1 port=15433 user=postgres dbname=postgres sslmode=disable" -c "select 1"

  # what the egress decides for a connection on its db listener, without a socket:
  $root/target/debug/weir route --config $root/examples/teesql/egress.toml --listener db --protocol plain

Each hop logs its connections below, tagged. Ctrl-C stops them all.

MSG
wait
