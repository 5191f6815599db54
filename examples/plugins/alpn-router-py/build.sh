#!/usr/bin/env bash
# Builds the Python twin of alpn-router into a weir plugin component (of
# contract 0.1.0, which weir keeps loading beside the current one),
# target/wasm32-wasip2/release/alpn_router_py.wasm, with componentize-py
# (from PyPI, installed into a virtual environment under target/ when it is
# not on the PATH).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
componentize=componentize-py
if ! command -v "$componentize" >/dev/null; then
    venv="$target/py-venv"
    if [ ! -x "$venv/bin/componentize-py" ]; then
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet componentize-py==0.25.1
    fi
    componentize="$venv/bin/componentize-py"
fi
mkdir -p "$target/wasm32-wasip2/release"
cd "$here"
"$componentize" -d "$root/wit/since_v0.1.0" -w weir-plugin componentize app -o "$target/wasm32-wasip2/release/alpn_router_py.wasm"
