#!/usr/bin/env python3
"""Holds 10,000 concurrent passthrough TLS connections through one weir (or
as many as the descriptor limit lets one process hold: two sockets per
connection), checks that every one of them still relays, all at once, and
reports weir's memory per connection and what opening them cost it.

Started by `bench/run.sh connections`, which raises the limits and builds
the binaries. Same upstream, load generator and weir config as the
side-by-side benchmark (bench/run.py); weir is pinned to CPU 0 with its
default two tokio workers, the load generator and the upstream to CPU 1.
"""

import datetime
import json
import os
import resource
import subprocess
import time

import run as bench

WANTED = 10_000
# weir raises its soft descriptor limit to the hard one; it needs two per
# connection plus a few dozen of its own, and sheds new connections within
# its descriptor reserve of the limit (1/16 of it, 16 to 1,024).
HARD_LIMIT = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
RESERVE = min(max(HARD_LIMIT // 16, 16), 1024)
CONNS = min(WANTED, (HARD_LIMIT - RESERVE - 64) // 2)


def descriptors(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def main():
    bench.WORK.mkdir(parents=True, exist_ok=True)
    bench.write_configs()
    upstream = bench.start_upstream(cpu=1)
    try:
        weir = bench.start_weir(bench.WORK / "weir.toml", "weir-connections", cpu=0)
    except BaseException:
        bench.stop(upstream)
        raise
    try:
        rss_before, fds_before, cpu_before = bench.rss_kib(weir.pid), descriptors(weir.pid), bench.cpu_seconds(weir.pid)
        started = time.time()
        holder = subprocess.Popen(
            ["taskset", "-c", "1", str(bench.BENCH), "idle", "--target", "127.0.0.1:10444",
             "--ca", str(bench.WORK / "ca.pem"), "--conns", str(CONNS)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        opened = json.loads(holder.stdout.readline())
        open_seconds = time.time() - started
        cpu_open = bench.cpu_seconds(weir.pid) - cpu_before
        time.sleep(2.0)
        rss_after, fds_after = bench.rss_kib(weir.pid), descriptors(weir.pid)
        holder.stdin.close()
        checked = json.loads(holder.stdout.readline())
        holder.wait(timeout=300)
    finally:
        bench.stop(weir, upstream)

    held = opened["open"]
    commit = bench.commit()
    date = datetime.datetime.now(datetime.timezone.utc)
    lines = [
        f"# {held:,} concurrent passthrough connections through one weir — {date:%Y-%m-%d %H:%M} UTC",
        "",
        f"Produced by `bench/run.sh connections` at commit `{commit}` on {os.cpu_count()} cores. "
        f"Each connection is a full TLS 1.3 handshake with the upstream through weir, then held open; "
        f"at the end every one echoes 16 bytes, all at once. weir is freshly started, so its RSS growth includes "
        f"the heap it grows for them (the side-by-side report measures idle memory after its other workloads, "
        f"on a warm heap).",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| connections asked for | {CONNS:,}" + ("" if CONNS == WANTED else
            f" (the hard descriptor limit here, {HARD_LIMIT:,}, less weir's descriptor reserve, {RESERVE:,}, caps one process at {CONNS:,} relayed connections)")
        + " |",
        f"| opened / failed to open | {held:,} / {opened['errors']:,} |",
        f"| still relaying when checked | {checked['alive']:,} |",
        f"| weir descriptors before / with them open | {fds_before:,} / {fds_after:,} |",
        f"| weir RSS before / with them open | {rss_before / 1024:,.1f} MiB / {rss_after / 1024:,.1f} MiB |",
        f"| weir RSS per connection | {(rss_after - rss_before) / max(held, 1):.2f} KiB |",
        f"| time to open them (256 at a time) | {open_seconds:.1f} s |",
        f"| weir CPU to accept, sniff, route and connect them | {cpu_open:.2f} s ({cpu_open / max(held, 1) * 1e6:.0f} µs each) |",
    ]
    text = "\n".join(lines) + "\n"
    bench.RESULTS.mkdir(parents=True, exist_ok=True)
    path = bench.RESULTS / f"connections-{date:%Y-%m-%d-%H%M}-{commit}.md"
    path.write_text(text)
    print(text)
    print(f"written to {path.relative_to(bench.ROOT)}")
    if checked["alive"] != held or opened["errors"]:
        raise SystemExit("some connections failed")


if __name__ == "__main__":
    main()
