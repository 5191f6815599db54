# Shared by the quickstart and the example run scripts (sourced, not run):
# builds what a demo needs and starts demo-upstream in the background.
# Expects `root` (the checkout) to be set and to be the current directory.

# Builds the plugins, weir and demo-upstream.
demo_build() {
    command -v cargo >/dev/null || { echo "weir needs a Rust toolchain installed with rustup (https://rustup.rs)" >&2; exit 1; }
    # etcd-client (fleet mode) compiles etcd's protobuf definitions with protoc.
    if ! command -v protoc >/dev/null; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq protobuf-compiler
        else
            echo "building weir needs protoc: apt-get install protobuf-compiler (Debian), or set PROTOC" >&2
            exit 1
        fi
    fi
    scripts/build-plugins.sh
    cargo build --locked -p weir -p demo-upstream
}

# demo_upstreams RUN_DIR ARGS...: starts demo-upstream writing into RUN_DIR
# (emptied first) with ARGS, stops it when the script exits, and waits
# until its CA is written (the sign that its servers are up).
demo_upstreams() {
    local run="$1"
    shift
    rm -rf "$run"
    mkdir -p "$run"
    target/debug/demo-upstream --dir "$run" "$@" &
    demo_pid=$!
    trap 'kill "$demo_pid" 2>/dev/null || true' EXIT
    for _ in $(seq 100); do
        [ -s "$run/ca.pem" ] && return 0
        kill -0 "$demo_pid" 2>/dev/null || { echo "the demo servers failed to start" >&2; exit 1; }
        sleep 0.1
    done
    echo "the demo servers did not start in time" >&2
    exit 1
}
