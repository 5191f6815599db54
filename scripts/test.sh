#!/usr/bin/env bash
# Runs the whole test suite: installs what the tests talk to, builds the
# plugins for wasm32-wasip2 and the weir binary, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

# Real peers the tests run: the openssl and curl clients, PostgreSQL 15
# (server and psql), Pebble, BIND 9 (named, tsig-keygen; dig and nsupdate),
# Chromium with chromedriver, etcd 3.4 (server and etcdctl), iproute2; python3 to
# build the Python example plugin, node and npm for the JavaScript one,
# protoc for etcd-client's build. Debian
# package names; only what is missing is installed.
missing=()
command -v openssl >/dev/null || missing+=(openssl)
command -v curl >/dev/null || missing+=(curl)
command -v psql >/dev/null || missing+=(postgresql-client-15)
# The Python example plugin is built with componentize-py in a virtual environment.
command -v python3 >/dev/null || missing+=(python3)
python3 -c "import venv, ensurepip" 2>/dev/null || missing+=(python3-venv)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql-15)
# Pebble, Let's Encrypt's ACME test server, and its DNS stub (pebble-challtestsrv).
command -v pebble >/dev/null && command -v pebble-challtestsrv >/dev/null || missing+=(pebble)
# BIND 9, the authoritative server DNS-01 records are published to.
[ -x /usr/sbin/named ] && [ -x /usr/sbin/tsig-keygen ] || missing+=(bind9)
command -v dig >/dev/null && command -v nsupdate >/dev/null || missing+=(bind9-dnsutils)
# Chromium and its WebDriver server, the dashboard test's browser.
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
# etcd, the store fleet mode shares one configuration through.
command -v etcd >/dev/null || missing+=(etcd-server)
command -v etcdctl >/dev/null || missing+=(etcd-client)
command -v protoc >/dev/null || missing+=(protobuf-compiler)
# ip, for the network namespace a fleet test cuts one node off in; timeout,
# to bound a process a test expects to exit.
command -v ip >/dev/null || missing+=(iproute2)
command -v timeout >/dev/null || missing+=(coreutils)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    else
        echo "the tests need: ${missing[*]} (apt-get install ${missing[*]})" >&2
        exit 1
    fi
fi

scripts/build-plugins.sh
# The CLI tests run the binary; same profile as the tests, so nothing is built twice.
cargo build --locked -p weir
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
cargo test --locked --workspace --no-fail-fast 2>&1 | tee "$log" || status=$?
# The same end-to-end tests again with the shipped plugins' builds for the
# older contracts (tests/contract-0.1.0, tests/contract-0.2.0): weir must run
# them unchanged. 0.2.0 added originate, so its rerun takes the egress tests too.
# (--workspace, not -p: the same features as the run above, so nothing is built again)
WEIR_TEST_CONTRACT=0.1.0 cargo test --locked --workspace --test e2e -- \
    passthrough:: termination:: attestation:: plugin_faults:: 2>&1 | tee -a "$log" || status=$?
WEIR_TEST_CONTRACT=0.2.0 cargo test --locked --workspace --test e2e -- \
    passthrough:: termination:: attestation:: plugin_faults:: egress:: 2>&1 | tee -a "$log" || status=$?
# A short coverage-guided run of every fuzz target.
scripts/fuzz-smoke.sh || status=$?
# One closing line for the whole run: cargo's last line belongs to whichever
# target ran last (often a crate without doc tests).
awk '/^test result:/ { for (i = 2; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i - 1); if ($i ~ /^failed;?$/) f += $(i - 1) } }
     END { printf "total: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
