#!/usr/bin/env python3
"""The soak: mixed traffic through one weir for --minutes (default 10) while
its config is rewritten and reloaded every second.

Traffic, all passthrough TLS to the benchmark upstream: new connections
without pause (8 concurrent, each a full handshake and a short echo), 500
long-lived connections opened at the start and checked at the end, and a
bulk upload (4 connections, 128 MiB) every 20 seconds. Each reload changes
the router's route table (so the plugin is configured anew), and every
--compile-every'th (default 30th; 1 = every reload) names a new .wasm: the router with a custom section that makes its bytes,
and so its hash, new, so weir compiles it and drops the old one. weir's RSS
is sampled every 5 seconds.

It passes when no connection failed, every long-lived connection still
relays, every reload succeeded, and RSS at the end is within GROWTH_BOUND_MIB
of RSS after the warm-up (the first minute, or a tenth of a shorter run).

Started by `bench/run.sh soak [--minutes N] [--compile-every N]`.
"""

import datetime
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request

import run as bench


def option(name, default):
    return type(default)(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default


MINUTES = option("--minutes", 10.0)
COMPILE_EVERY = option("--compile-every", 30)
DURATION = MINUTES * 60
WARM_UP = min(60.0, DURATION / 10)
GROWTH_BOUND_MIB = 16
LONG_LIVED = 500
BULK_EVERY = 20
ADMIN = "127.0.0.1:10449"
CONFIG = bench.WORK / "soak.toml"


def leb128(n):
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def router_wasm(generation):
    """The router component with a custom section naming the generation:
    the same code, bytes (and a hash) of its own."""
    path = bench.WORK / f"router-{generation // COMPILE_EVERY}.wasm"
    if not path.exists():
        for old in bench.WORK.glob("router-*.wasm"):
            old.unlink()
        name, payload = b"weir-soak", str(generation // COMPILE_EVERY).encode()
        body = leb128(len(name)) + name + payload
        path.write_bytes(bench.PLUGIN.read_bytes() + b"\x00" + leb128(len(body)) + body)
    return path


def config(generation):
    wasm = router_wasm(generation)
    host, port = bench.UPSTREAM
    return f"""
[listeners.bench]
bind = "127.0.0.1:10444"
plugins = ["router"]
idle_timeout = "1h"{bench.WEIR_CLIENTS}

[plugins.router]
wasm = "{wasm}"
config.routes."{bench.SNI}" = {{ pool = "upstream" }}
config.routes."generation-{generation}.test" = {{ reject = "generation {generation}" }}
config.default = {{ reject = "unknown name" }}

[pools.upstream]
servers = ["{host}:{port}"]

[admin]
bind = "{ADMIN}"

[reload]
watch = false
"""


def write_config(generation):
    staged = CONFIG.with_suffix(".tmp")
    staged.write_text(config(generation))
    staged.replace(CONFIG)


def reload():
    """Reloads through the admin API: (error or None, milliseconds it took)."""
    request = urllib.request.Request(f"http://{ADMIN}/api/reload", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            report = json.loads(reply.read())
    except urllib.error.HTTPError as e:
        report = json.loads(e.read())
        report.setdefault("error", f"HTTP {e.code}")
    return report.get("error"), report.get("millis", 0)


def load(*args):
    return subprocess.Popen(
        [str(bench.BENCH), *args, "--target", "127.0.0.1:10444", "--ca", str(bench.WORK / "ca.pem")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )


def main():
    bench.WORK.mkdir(parents=True, exist_ok=True)
    write_config(0)
    upstream = bench.start_upstream()
    try:
        weir = bench.start_weir(CONFIG, "weir-soak")
    except BaseException:
        bench.stop(upstream)
        raise
    samples, reloads, reload_errors, bulks, bulk_failures = [], 0, [], 0, []
    reload_millis, compile_millis = [], []
    try:
        holder = load("idle", "--conns", str(LONG_LIVED))
        opened = json.loads(holder.stdout.readline())
        churn = load("rate", "--concurrency", "8", "--seconds", str(DURATION))
        started = time.time()
        bulk, next_bulk, next_sample = None, started, started
        while (now := time.time()) - started < DURATION:
            reloads += 1
            write_config(reloads)
            error, millis = reload()
            (compile_millis if reloads % COMPILE_EVERY == 0 else reload_millis).append(millis)
            if error:
                reload_errors.append(f"reload {reloads}: {error}")
            if now >= next_sample:
                samples.append((now - started, bench.rss_kib(weir.pid)))
                next_sample += 5
            if bulk is not None and bulk.poll() is not None:
                out = bulk.stdout.read()
                if bulk.returncode != 0 or not out.strip():
                    bulk_failures.append(f"bulk exited {bulk.returncode}")
                bulk = None
            if bulk is None and now >= next_bulk:
                bulk = load("bulk", "--conns", "4", "--bytes", str(128 << 20))
                bulks += 1
                next_bulk += BULK_EVERY
            time.sleep(max(0.0, 1.0 - (time.time() - now)))
        rate = json.loads(churn.communicate(timeout=120)[0].strip().splitlines()[-1])
        if bulk is not None:
            out, _ = bulk.communicate(timeout=300)
            if bulk.returncode != 0 or not out.strip():
                bulk_failures.append(f"bulk exited {bulk.returncode}")
        samples.append((time.time() - started, bench.rss_kib(weir.pid)))
        holder.stdin.close()
        checked = json.loads(holder.stdout.readline())
        holder.wait(timeout=120)
    finally:
        bench.stop(weir, upstream)

    warm = next(rss for at, rss in samples if at >= WARM_UP) if any(at >= WARM_UP for at, _ in samples) else samples[0][1]
    final = samples[-1][1]
    peak = max(rss for _, rss in samples)
    growth_mib = (final - warm) / 1024
    failures = []
    if rate["errors"]:
        failures.append(f"{rate['errors']} new connections failed")
    if opened["errors"] or checked["alive"] != opened["open"] or opened["open"] != LONG_LIVED:
        failures.append(f"long-lived: {opened['open']} opened, {opened['errors']} failed, {checked['alive']} alive at the end")
    failures += reload_errors[:5] + bulk_failures
    if growth_mib > GROWTH_BOUND_MIB:
        failures.append(f"RSS grew {growth_mib:.1f} MiB after the warm-up (bound {GROWTH_BOUND_MIB} MiB)")

    commit = bench.commit()
    date = datetime.datetime.now(datetime.timezone.utc)
    curve = ", ".join(
        f"{int(at // 60)}:{int(at % 60):02d} {rss / 1024:.1f}" for at, rss in samples[:: max(1, len(samples) // 10)]
    )
    def p50_max(millis):
        return f"{statistics.median(millis):.0f}, {max(millis)} ms" if millis else "none"

    every = "every reload" if COMPILE_EVERY == 1 else f"every {COMPILE_EVERY}th"
    lines = [
        f"# Soak: {MINUTES:g} minutes of mixed traffic, a reload every second — {date:%Y-%m-%d %H:%M} UTC",
        "",
        f"Produced by `bench/run.sh soak --minutes {MINUTES:g} --compile-every {COMPILE_EVERY}` at commit `{commit}` on {os.cpu_count()} cores "
        "(weir, load and upstream unpinned, sharing them).",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| reloads (route table each time, new component {every}) | {reloads:,}, {len(reload_errors)} failed |",
        f"| reload time, route table / new component (p50, max) | {p50_max(reload_millis)} / {p50_max(compile_millis)} |",
        f"| new connections (8 concurrent, full TLS handshake + echo) | {rate['connections']:,} "
        f"({rate['per_second']:,.0f}/s), {rate['errors']} failed |",
        f"| long-lived connections relaying at the end | {checked['alive']} of {opened['open']} opened |",
        f"| bulk uploads (4 × 32 MiB) | {bulks}, {len(bulk_failures)} failed |",
        f"| weir RSS after the warm-up ({WARM_UP:.0f} s) / peak / end | {warm / 1024:.1f} / {peak / 1024:.1f} / "
        f"{final / 1024:.1f} MiB |",
        f"| RSS growth after the warm-up | {growth_mib:+.1f} MiB (bound {GROWTH_BOUND_MIB} MiB) |",
        f"| RSS over time (m:ss MiB) | {curve} |",
        "",
        "Result: " + ("passed." if not failures else "FAILED: " + "; ".join(failures)),
    ]
    text = "\n".join(lines) + "\n"
    bench.RESULTS.mkdir(parents=True, exist_ok=True)
    path = bench.RESULTS / f"soak-{date:%Y-%m-%d-%H%M}-{commit}.md"
    path.write_text(text)
    print(text)
    print(f"written to {path.relative_to(bench.ROOT)}")
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
