#!/usr/bin/env bash
# A short coverage-guided run of every fuzz target (part of the test suite):
# stable Rust, libFuzzer without a sanitizer (the long runs in
# docs/reliability.md use AddressSanitizer on nightly), debug assertions on,
# seeded by fuzz/seed.sh into a scratch corpus. Any crash fails it, with the
# input left in <fuzz dir>/artifacts/<target>/.
#
# Each crate's parsers are fuzzed from a fuzz crate of its own, so the wire
# and attestation targets build without tokio, rustls or wasmtime.
#
#   scripts/fuzz-smoke.sh [SECONDS_PER_TARGET]     (default 20)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-20}"
# Target -> the cargo-fuzz crate it lives in.
declare -A home=(
    [sniff]=crates/weir-wire/fuzz [postgres]=crates/weir-wire/fuzz [proxy_header]=crates/weir-wire/fuzz
    [ratls]=crates/weir-attest/fuzz
    [config]=fuzz [mesh_rule]=fuzz
)
targets=(sniff postgres proxy_header ratls config mesh_rule)

# cargo-fuzz, pinned, installed into target/tools rather than ~/.cargo.
tools="$PWD/target/tools"
if ! "$tools/bin/cargo-fuzz" --version 2>/dev/null | grep -q '^cargo-fuzz 0.13.2$'; then
    cargo install --quiet --locked --root "$tools" cargo-fuzz --version 0.13.2
fi
# Its own target directory: the long runs build with other flags (ASan, nightly).
# fuzz DIR SUBCOMMAND ARGS...
fuzz() { (cd "$1" && "$tools/bin/cargo-fuzz" fuzz "$2" --target-dir "$root/target/fuzz-smoke" "${@:3}"); }
root="$PWD"

for dir in crates/weir-wire/fuzz crates/weir-attest/fuzz fuzz; do
    fuzz "$dir" build -s none -O -a
done
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
# One target per core at a time: each run is one single-threaded process.
jobs="$(nproc)"
smoke() {
    local target="$1"
    # Seeds only, so each smoke run starts from the same place.
    WEIR_CORPUS="$scratch/$target.seed" bash fuzz/seed.sh "$target" >/dev/null
    local rc=0
    fuzz "${home[$target]}" run -s none -O -a "$target" "$scratch/$target.seed/corpus/$target" -- \
        -max_total_time="$seconds" -print_final_stats=1 >"$scratch/$target.log" 2>&1 || rc=$?
    echo "$rc" >"$scratch/$target.rc"
}
for target in "${targets[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || true; done
    smoke "$target" &
done
wait
failed=()
for target in "${targets[@]}"; do
    log="$scratch/$target.log"
    if [ "$(cat "$scratch/$target.rc" 2>/dev/null)" = 0 ]; then
        runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")"
        edges="$(grep -o 'cov: [0-9]*' "$log" | tail -1)"
        echo "fuzz smoke: $target: ${runs:-?} executions in ${seconds} s, ${edges:-cov: ?}, no crash"
    else
        tail -40 "$log"
        echo "fuzz smoke: $target FAILED (input in ${home[$target]}/artifacts/$target/)"
        failed+=("$target")
    fi
done
[ "${#failed[@]}" -eq 0 ] || { echo "fuzz smoke failed: ${failed[*]}"; exit 1; }
