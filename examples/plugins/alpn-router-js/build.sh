#!/usr/bin/env bash
# Builds the JavaScript twin of alpn-router into a weir plugin component
# (world weir-plugin-core of contract 0.2.0),
# target/wasm32-wasip2/release/alpn_router_js.wasm, with componentize-js
# (from npm, the version package-lock.json pins, installed under target/).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
tools="$target/js-tools"
if [ ! -x "$tools/node_modules/.bin/componentize-js" ] || ! cmp -s "$here/package-lock.json" "$tools/package-lock.json"; then
    mkdir -p "$tools"
    cp "$here/package.json" "$here/package-lock.json" "$tools/"
    (cd "$tools" && npm ci --no-audit --no-fund --loglevel=error)
fi
mkdir -p "$target/wasm32-wasip2/release"
out="$target/wasm32-wasip2/release/alpn_router_js.wasm"
# Only rebuilt when the source, the WIT or the tools changed.
if [ -f "$out" ] && [ "$out" -nt "$here/app.js" ] && [ "$out" -nt "$root/wit/since_v0.2.0/weir.wit" ] \
    && [ "$out" -nt "$tools/package-lock.json" ]; then
    exit 0
fi
"$tools/node_modules/.bin/componentize-js" "$here/app.js" \
    -w "$root/wit/since_v0.2.0" -n weir-plugin-core \
    -d stdio random clocks http fetch-event \
    -o "$out"
