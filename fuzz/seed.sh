#!/usr/bin/env bash
# Seeds corpus/<target>/ (under fuzz/, or under $WEIR_CORPUS, an absolute
# path, when set) for every fuzz target, or those named, from the shared test
# vectors ($WEIR_TESTDATA, absolute; default ../shared/testdata beside the
# checkout), the example configs and a set of Traefik rules. Existing corpus
# files are kept: a corpus grown by earlier runs goes on growing.
#
#   fuzz/seed.sh [sniff|postgres|ratls|config|mesh_rule|proxy_header ...]
set -euo pipefail
cd "$(dirname "$0")"
testdata="${WEIR_TESTDATA:-../../shared/testdata}"
[ -d "$testdata" ] || { echo "no test vectors at $testdata (set WEIR_TESTDATA)" >&2; exit 1; }
targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=(sniff postgres ratls config mesh_rule proxy_header)

for target in "${targets[@]}"; do
    dir="${WEIR_CORPUS:-.}/corpus/$target"
    mkdir -p "$dir"
    case "$target" in
        sniff) cp "$testdata"/clienthello/*.bin "$dir"/ ;;
        postgres)
            cp "$testdata"/clienthello/psql-*.bin "$dir"/
            printf 'S' >"$dir/answer-s"
            printf 'N' >"$dir/answer-n"
            printf '\0\0\0\x08\x04\xd2\x16\x30' >"$dir/gssencrequest"
            ;;
        ratls) cp "$testdata"/attestation/*.bin "$dir"/ ;;
        config)
            for config in ../examples/*/weir.toml ../examples/plugins/*/weir.toml; do
                cp "$config" "$dir/$(echo "${config#../examples/}" | tr / _)"
            done
            ;;
        mesh_rule)
            n=0
            while IFS= read -r rule; do
                n=$((n + 1))
                printf '%s' "$rule" >"$dir/rule-$n"
            done <<'RULES'
HostSNI(`app.mesh.localhost`)
HostSNI(`*`)
HostSNI(`a.example.com`, `b.example.com`)
HostSNIRegexp(`^[a-z0-9-]+\.example\.com$`)
HostSNI(`admin.mesh.localhost`) && ClientIP(`127.0.0.1/32`)
ClientIP(`10.0.0.0/8`, `::1`) || !ALPN(`h2`)
(HostSNI(`a.example.com`) || HostSNIRegexp(`^{sub:[a-z]+}\.example\.com$`)) && ALPN(`http/1.1`)
RULES
            ;;
        proxy_header)
            printf 'PROXY TCP4 203.0.113.7 198.51.100.1 4242 443\r\n\x16\x03\x01' >"$dir/v1-tcp4"
            printf 'PROXY TCP6 2001:db8::1 2001:db8::2 1000 443\r\n' >"$dir/v1-tcp6"
            printf 'PROXY UNKNOWN\r\n' >"$dir/v1-unknown"
            # v2, TCP over IPv4, with an authority TLV for a.example.
            printf '\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x18\xcb\x00\x71\x07\xc6\x33\x64\x01\x10\x92\x01\xbb\x02\x00\x09a.example' >"$dir/v2-tcp4"
            printf '\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00' >"$dir/v2-local"
            ;;
        *) echo "unknown fuzz target: $target" >&2; exit 1 ;;
    esac
done
