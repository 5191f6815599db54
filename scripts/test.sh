#!/usr/bin/env bash
# Runs the whole test suite: installs what the tests talk to, builds the
# plugins for wasm32-wasip2 and the weir binary, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

# Real peers the tests run: the openssl command-line client.
if ! command -v openssl >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq openssl
    else
        echo "the tests need the openssl command (apt-get install openssl)" >&2
        exit 1
    fi
fi

scripts/build-plugins.sh
# The CLI tests run the binary; same profile as the tests, so nothing is built twice.
cargo build --locked -p weir
cargo test --locked --workspace
