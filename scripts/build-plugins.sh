#!/usr/bin/env bash
# Builds every plugin (the shipped ones, the examples, the test plugins) as
# wasm32-wasip2 components into target/wasm32-wasip2/release/*.wasm, the
# Python and JavaScript examples included.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! rustup target list --installed | grep -qx wasm32-wasip2; then
    rustup target add wasm32-wasip2
fi
cargo build --locked --release --target wasm32-wasip2 \
    -p static-router -p dstack-router -p mesh-router -p attestation-allowlist -p misbehave \
    -p canary -p alpn-router -p maintenance -p rate-limit -p least-loaded -p egress
# The Python example plugin (componentize-py, from PyPI). It needs python3
# with venv; scripts/test.sh installs them, the quickstart does without.
if command -v componentize-py >/dev/null || python3 -c "import venv, ensurepip" 2>/dev/null; then
    examples/plugins/alpn-router-py/build.sh
else
    echo "build-plugins: skipping the Python example plugin (python3 with venv is not installed)" >&2
fi
# The JavaScript example plugin (componentize-js, from npm). It needs node
# and npm; scripts/test.sh installs them, the quickstart does without.
if command -v node >/dev/null && command -v npm >/dev/null; then
    examples/plugins/alpn-router-js/build.sh
else
    echo "build-plugins: skipping the JavaScript example plugin (node and npm are not installed)" >&2
fi
