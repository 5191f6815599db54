#!/usr/bin/env python3
"""Runs weir beside HAProxy, nginx stream and a direct connection and writes
a Markdown report of what it measured to bench/results/.

Passthrough by default; with --terminate, every proxy terminates the
client's TLS with the same certificate and key as the upstream's and sends
the stream in plain to the upstream's plaintext port (the direct baseline
is then the TLS upstream itself: the cost of TLS at the endpoint); with
--reencrypt, the proxies terminate the same way and open TLS to the
upstream, verifying its certificate against the bench CA.

Started by bench/run.sh, which installs the proxies and builds the binaries.
The proxy under test is pinned to CPU 0 and limited to one thread / worker;
the TLS upstream and the load generator share CPU 1. With --workers N the
proxy gets N threads / workers on CPUs 0 .. N-1 (so with 2 on a 2-core
machine it shares CPU 1 with them): how its rate scales with cores. Client throughput is
bounded by the load generator and the upstream (both do TLS), so the proxy's
own CPU time per connection and per GiB, read from /proc, are reported beside
it. Every figure is the median of the repeats.
"""

import datetime
import json
import os
import platform
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work"
RESULTS = ROOT / "bench" / "results"
RELEASE = ROOT / "target" / "release"
BENCH = RELEASE / "weir-bench"
WEIR = RELEASE / "weir"
PLUGIN = ROOT / "target" / "wasm32-wasip2" / "release" / "static_router.wasm"

UPSTREAM = ("127.0.0.1", 10443)
# The same upstream without TLS, for proxies that terminate.
PLAIN_UPSTREAM = ("127.0.0.1", 10448)
SNI = "bench.test"
GIB = 1 << 30

QUICK = "--quick" in sys.argv
REENCRYPT = "--reencrypt" in sys.argv
TERMINATE = "--terminate" in sys.argv or REENCRYPT
REPEATS = 1 if QUICK else 3
BULK_BYTES = (256 << 20) if QUICK else GIB
RATE_SECONDS = 2 if QUICK else 5
SERIAL_SECONDS = 1 if QUICK else 3
# Every proxy's listener holds a connection in the kernel until its first
# bytes (TCP_DEFER_ACCEPT): weir `defer_accept`, HAProxy `defer-accept`,
# nginx `deferred` (from nginx 1.25.5 on).
DEFER = "--defer" in sys.argv
# Another weir binary (an earlier commit's release build) measured in the
# same run as `weir-base`, so a change's before and after share the hour.
BASELINE = sys.argv[sys.argv.index("--baseline") + 1] if "--baseline" in sys.argv else None
WORKERS = int(sys.argv[sys.argv.index("--workers") + 1]) if "--workers" in sys.argv else 1
PROXY_CPUS = "0" if WORKERS == 1 else f"0-{WORKERS - 1}"
# A proxy holds two descriptors per connection: where the descriptor limit
# is below 20,000 + headroom, fewer idle connections are opened (the report
# says how many). The headroom covers weir's descriptor reserve (1/16 of the
# limit, at most 1,024, kept free by shedding new connections) and the
# proxies' own descriptors.
FD_LIMIT = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
IDLE_CONNS = min(2000 if QUICK else 10_000, (FD_LIMIT - min(FD_LIMIT // 16, 1024) - 200) // 2)


def wait_for_port(port, process=None, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def process_tree(pid):
    """pid and all its descendants."""
    children = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def cpu_seconds(pid):
    """CPU time of a process tree, all threads, in seconds. schedstat counts
    nanoseconds on the CPU; utime/stime in /proc/PID/stat are sampled at the
    clock tick and undercount processes that run in short bursts."""
    total_ns = 0
    for p in process_tree(pid):
        try:
            tasks = list(Path(f"/proc/{p}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                total_ns += int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return total_ns / 1e9


def rss_kib(pid):
    total = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def client(*args):
    """Runs the load generator on CPU 1 and returns its JSON report."""
    out = subprocess.run(
        ["taskset", "-c", "1", str(BENCH), *args, "--ca", str(WORK / "ca.pem")],
        check=True, capture_output=True, text=True, timeout=600,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def pinned(cpu):
    """The command prefix that pins a process to one CPU (none for None)."""
    return [] if cpu is None else ["taskset", "-c", str(cpu)]


def started(command, port, **popen):
    """Starts `command` and returns it once it listens on `port`; a process
    that does not get there is killed."""
    process = subprocess.Popen(command, **popen)
    try:
        wait_for_port(port, process)
    except BaseException:
        process.kill()
        process.wait()
        raise
    return process


def start_upstream(cpu=None):
    """The benchmark's TLS upstream, listening on UPSTREAM."""
    command = [*pinned(cpu), str(BENCH), "upstream", "--listen", f"{UPSTREAM[0]}:{UPSTREAM[1]}", "--dir", str(WORK),
               "--plain", f"{PLAIN_UPSTREAM[0]}:{PLAIN_UPSTREAM[1]}"]
    return started(command, UPSTREAM[1], stdout=subprocess.DEVNULL)


def start_weir(config, log_name, cpu=None):
    """`weir run --config config`, warnings logged to WORK/<log_name>.log,
    listening on 10444 (the port of every benchmark config)."""
    return started(
        [*pinned(cpu), str(WEIR), "run", "--config", str(config)], 10444,
        stdout=subprocess.DEVNULL, stderr=open(WORK / f"{log_name}.log", "w"),
        env={**os.environ, "WEIR_LOG": "warn"},
    )


def stop(*processes):
    """SIGTERM, then SIGKILL for a process still there after 10 s."""
    for process in processes:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def commit():
    """The commit measured, marked `+changes` when tracked files differ."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT).stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return git("rev-parse", "--short", "HEAD") + ("+changes" if dirty else "")


class Target:
    def __init__(self, name, port, command=None, version=""):
        self.name, self.port, self.command, self.version = name, port, command, version
        self.process = None

    def start(self):
        if self.command:
            self.process = subprocess.Popen(
                ["taskset", "-c", PROXY_CPUS, *self.command],
                stdout=subprocess.DEVNULL, stderr=open(WORK / f"{self.name}.log", "w"),
                env={**os.environ, "TOKIO_WORKER_THREADS": str(WORKERS), "WEIR_LOG": "warn"},
            )
            wait_for_port(self.port, self.process)

    def stop(self):
        if self.process:
            stop(self.process)
            self.process = None

    def cpu(self):
        return cpu_seconds(self.process.pid) if self.process else None

    def rss(self):
        return rss_kib(self.process.pid) if self.process else None


WEIR_DEFER = "\ndefer_accept = true" if DEFER else ""
HAPROXY_DEFER = " defer-accept" if DEFER else ""


def nginx_stream_defers():
    """Whether nginx's stream `listen` takes `deferred` (1.25.5 and later)."""
    try:
        out = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr
    except OSError:
        return False
    found = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out)
    return bool(found) and tuple(int(n) for n in found.groups()) >= (1, 25, 5)


NGINX_DEFER = " deferred" if DEFER and nginx_stream_defers() else ""


def haproxy_preamble(global_extra="", defaults_extra=""):
    """HAProxy's global and defaults sections: one thread, TCP mode."""
    return f"""
global
    maxconn {IDLE_CONNS + 100}
{global_extra}    nbthread {WORKERS}
    log stderr format raw local0 err

defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m
{defaults_extra}"""


def nginx_preamble():
    """nginx's main and events sections: one worker, the stream module."""
    return f"""
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes {WORKERS};
worker_rlimit_nofile {FD_LIMIT};
daemon off;
pid {WORK}/nginx.pid;
error_log stderr error;

events {{
    worker_connections {2 * IDLE_CONNS + 400};
}}
"""


# The load generator spreads its sockets over 32 loopback sources (for
# ephemeral ports): each is a client of its own, as HAProxy and nginx,
# which have no per-client limit, see them. weir's default would count the
# whole 127.0.0.0/24 as one client of at most 512 connections.
WEIR_CLIENTS = "\nclient_prefix_v4 = 32"


def weir_passthrough(bind, upstream, relay="copy"):
    """weir passing `SNI` through to `upstream` (host:port), refusing other names."""
    return f"""
[listeners.bench]
bind = "{bind}"
relay = "{relay}"
plugins = ["router"]{WEIR_DEFER}{WEIR_CLIENTS}

[plugins.router]
wasm = "{PLUGIN}"
config.routes."{SNI}" = {{ pool = "upstream" }}
config.default = {{ reject = "unknown name" }}

[pools.upstream]
servers = ["{upstream}"]
"""


def haproxy_passthrough(bind, upstream):
    """HAProxy routing `SNI` by the ClientHello to `upstream`, splicing where it sees fit."""
    return haproxy_preamble(global_extra="    maxpipes 128\n", defaults_extra="    option splice-auto\n") + f"""
frontend bench
    bind {bind}{HAPROXY_DEFER}
    tcp-request inspect-delay 5s
    tcp-request content accept if {{ req.ssl_hello_type 1 }}
    use_backend upstream if {{ req.ssl_sni -i {SNI} }}

backend upstream
    server s1 {upstream}
"""


def nginx_passthrough(bind, upstream):
    """nginx stream routing `SNI` with `ssl_preread` to `upstream`."""
    return nginx_preamble() + f"""
stream {{
    map $ssl_preread_server_name $upstream {{
        {SNI} {upstream};
        default 127.0.0.1:1;
    }}
    server {{
        listen {bind}{NGINX_DEFER};
        ssl_preread on;
        proxy_pass $upstream;
        proxy_timeout 10m;
    }}
}}
"""


def write_configs():
    if TERMINATE:
        write_terminate_configs()
        return
    upstream = f"{UPSTREAM[0]}:{UPSTREAM[1]}"
    (WORK / "weir.toml").write_text(weir_passthrough("127.0.0.1:10444", upstream))
    (WORK / "weir-auto.toml").write_text(weir_passthrough("127.0.0.1:10447", upstream, relay="auto"))
    (WORK / "weir-base.toml").write_text(weir_passthrough("127.0.0.1:10454", upstream))
    (WORK / "haproxy.cfg").write_text(haproxy_passthrough("127.0.0.1:10445", upstream))
    (WORK / "nginx.conf").write_text(nginx_passthrough("127.0.0.1:10446", upstream))


def write_terminate_configs():
    """weir, HAProxy and nginx terminating TLS with the upstream's own
    certificate and key (ECDSA P-256), routing by SNI, to the plaintext port
    (or, re-encrypting, to the TLS port, verified against the bench CA)."""
    host, port = UPSTREAM if REENCRYPT else PLAIN_UPSTREAM
    ca = WORK / "ca.pem"
    weir_then = f', reencrypt = {{ ca = "bench", server_name = "{SNI}" }}' if REENCRYPT else ""
    haproxy_tls = f" ssl verify required ca-file {ca} sni str({SNI})" if REENCRYPT else ""
    nginx_tls = (
        f"proxy_ssl on;\n        proxy_ssl_verify on;\n        proxy_ssl_trusted_certificate {ca};\n"
        f"        proxy_ssl_name {SNI};\n        proxy_ssl_server_name on;\n"
        # nginx 1.22 offers the upstream TLS 1.2 at most unless told.
        "        proxy_ssl_protocols TLSv1.2 TLSv1.3;\n        "
        if REENCRYPT else ""
    )
    (WORK / "weir.toml").write_text(f"""
[listeners.bench]
bind = "127.0.0.1:10444"
plugins = ["router"]{WEIR_DEFER}{WEIR_CLIENTS}

[plugins.router]
wasm = "{PLUGIN}"
config.routes."{SNI}" = {{ pool = "upstream", terminate = {{ certificate = "bench"{weir_then} }} }}
config.default = {{ reject = "unknown name" }}

[cas.bench]
file = "{ca}"

[certificates.bench]
cert = "{WORK / 'bench.pem'}"
key = "{WORK / 'bench-key.pem'}"

[pools.upstream]
servers = ["{host}:{port}"]
""")
    (WORK / "haproxy.cfg").write_text(haproxy_preamble() + f"""
frontend bench
    bind 127.0.0.1:10445 ssl crt {WORK / 'bench-combined.pem'}{HAPROXY_DEFER}
    use_backend upstream if {{ ssl_fc_sni -i {SNI} }}

backend upstream
    server s1 {host}:{port}{haproxy_tls}
""")
    (WORK / "nginx.conf").write_text(nginx_preamble() + f"""
stream {{
    map $ssl_server_name $upstream {{
        {SNI} {host}:{port};
        default 127.0.0.1:1;
    }}
    server {{
        listen 127.0.0.1:10446 ssl{NGINX_DEFER};
        ssl_certificate {WORK / 'bench.pem'};
        ssl_certificate_key {WORK / 'bench-key.pem'};
        # nginx before 1.23.4 accepts TLS 1.2 at most unless told.
        ssl_protocols TLSv1.2 TLSv1.3;
        {nginx_tls}proxy_pass $upstream;
        proxy_timeout 10m;
    }}
}}
""")


def version(command):
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=10)
        return (out.stdout + out.stderr).strip().splitlines()[0]
    except (OSError, IndexError):
        return "?"


def timed(target, *args):
    """Runs the load generator with `args`; its report and the proxy's CPU
    seconds meanwhile (None for the direct baseline)."""
    cpu0 = target.cpu()
    result = client(*args)
    cpu = target.cpu()
    return result, (None if cpu is None else cpu - cpu0)


def measure_once(target, idle):
    """One run of every workload against one target."""
    figures = {}
    port = f"127.0.0.1:{target.port}"
    for conns in (1, 64):
        bulk, cpu = timed(target, "bulk", "--target", port, "--conns", str(conns), "--bytes", str(BULK_BYTES))
        figures[f"bulk{conns}_mbps"] = bulk["mb_per_s"]
        if cpu is not None:
            figures[f"bulk{conns}_cpu_ms_per_gib"] = cpu / (bulk["bytes"] / GIB) * 1000

    rate, cpu = timed(target, "rate", "--target", port, "--concurrency", "64", "--seconds", str(RATE_SECONDS))
    figures["rate_per_s"] = rate["per_second"]
    figures["rate_p50_us"] = rate["p50_us"]
    figures["rate_p99_us"] = rate["p99_us"]
    figures["rate_errors"] = rate["errors"]
    figures["rate_tls13_share"] = rate["tls13"] / max(rate["connections"], 1) * 100
    if cpu is not None:
        figures["rate_cpu_us_per_conn"] = cpu / max(rate["connections"], 1) * 1e6

    serial = client("rate", "--target", port, "--concurrency", "1", "--seconds", str(SERIAL_SECONDS))
    figures["serial_p50_us"] = serial["p50_us"]
    figures["serial_p99_us"] = serial["p99_us"]

    # Resumption is between the client and whoever terminates: a proxy that
    # terminates (the upstream issues no tickets, so direct is left out).
    if TERMINATE and target.process:
        resumed, cpu = timed(
            target, "rate", "--target", port, "--concurrency", "64", "--seconds", str(RATE_SECONDS), "--resume"
        )
        figures["resumed_per_s"] = resumed["per_second"]
        figures["resumed_share"] = resumed["resumed"] / max(resumed["connections"], 1) * 100
        figures["resumed_cpu_us_per_conn"] = cpu / max(resumed["connections"], 1) * 1e6
        figures["rate_errors"] += resumed["errors"]

    if idle and target.process:
        before = target.rss()
        holder = subprocess.Popen(
            ["taskset", "-c", "1", str(BENCH), "idle", "--target", port,
             "--ca", str(WORK / "ca.pem"), "--conns", str(IDLE_CONNS)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        opened = json.loads(holder.stdout.readline())
        time.sleep(1.0)
        after = target.rss()
        holder.stdin.close()
        checked = json.loads(holder.stdout.readline())
        holder.wait(timeout=120)
        figures["idle_open"] = opened["open"]
        figures["idle_alive"] = checked["alive"]
        figures["idle_kib_per_conn"] = (after - before) / max(opened["open"], 1)
    return figures


def measure(targets):
    """Every workload against every target, REPEATS times, the targets taken
    in turn within each repeat so that all of them see the same machine
    state; medians of the repeats (errors summed)."""
    samples = {t.name: [] for t in targets}
    for round_ in range(REPEATS):
        for target in targets:
            print(f"== run {round_ + 1}/{REPEATS}: {target.name}", flush=True)
            target.start()
            try:
                samples[target.name].append(measure_once(target, idle=round_ == 0))
            finally:
                target.stop()
    results = {}
    for name, runs in samples.items():
        keys = {k for run in runs for k in run}
        results[name] = {
            k: (sum if k == "rate_errors" else statistics.median)([run[k] for run in runs if k in run]) for k in keys
        }
        print(name, json.dumps(results[name]), flush=True)
    return results


ROWS = [
    # key, label, unit, higher is better
    ("bulk1_mbps", "bulk, 1 connection", "MB/s", True),
    ("bulk64_mbps", "bulk, 64 connections", "MB/s", True),
    ("bulk1_cpu_ms_per_gib", "proxy CPU per GiB, 1 connection", "ms", False),
    ("bulk64_cpu_ms_per_gib", "proxy CPU per GiB, 64 connections", "ms", False),
    ("rate_per_s", "new TLS connections/s, 64 concurrent", "conn/s", True),
    ("rate_p50_us", "connect+handshake p50, 64 concurrent", "µs", False),
    ("rate_p99_us", "connect+handshake p99, 64 concurrent", "µs", False),
    ("rate_cpu_us_per_conn", "proxy CPU per connection", "µs", False),
    ("rate_tls13_share", "connections on TLS 1.3", "%", True),
    ("serial_p50_us", "connect+handshake p50, serial", "µs", False),
    ("serial_p99_us", "connect+handshake p99, serial", "µs", False),
    ("resumed_per_s", "resumed TLS connections/s, 64 concurrent", "conn/s", True),
    ("resumed_share", "connections that resumed", "%", True),
    ("resumed_cpu_us_per_conn", "proxy CPU per resumed connection", "µs", False),
    ("idle_kib_per_conn", f"RSS per idle connection ({IDLE_CONNS} open)", "KiB", False),
]


def fmt(value):
    if value is None:
        return "–"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}"


def report(results, targets, facts):
    names = [t.name for t in targets]
    flags = (
        (" --reencrypt" if REENCRYPT else " --terminate" if TERMINATE else "")
        + (" --quick" if QUICK else "")
        + (f" --workers {WORKERS}" if WORKERS != 1 else "")
        + (" --defer" if DEFER else "")
        + (f" --baseline {BASELINE}" if BASELINE else "")
    )
    threads = (
        "on CPU 0 with one thread (weir: one tokio worker"
        if WORKERS == 1
        else f"on CPUs {PROXY_CPUS} with {WORKERS} threads, sharing CPU 1 with the load generator and the "
        f"upstream (weir: {WORKERS} tokio workers"
    )
    nbthread, workers = f"`nbthread {WORKERS}`", ("one worker" if WORKERS == 1 else f"{WORKERS} workers")
    what = "re-encrypting TLS" if REENCRYPT else "terminating TLS" if TERMINATE else "passing TLS through"
    lines = [
        f"# weir beside HAProxy, nginx and a direct connection, {what} — {facts['date']}",
        "",
        "Produced by `bench/run.sh" + flags + f"` at commit `{facts['commit']}`.",
        "",
        "| machine | |",
        "| --- | --- |",
    ]
    for key in ("cpu", "cores", "kernel", "weir", "haproxy", "nginx", "rustc"):
        lines.append(f"| {key} | {facts[key]} |")
    if TERMINATE:
        lines += [
            "",
            "Each proxy terminates the client's TLS (SNI `bench.test`, full TLS 1.3 handshake each, no "
            "resumption, except in the resumed rows, where the client keeps the proxy's tickets and resumes "
            "with them, a PSK with a fresh X25519 exchange; the proxies' default ticket settings) with the "
            "same ECDSA P-256 certificate and key as the upstream's, and relays the stream "
            + ("over a new TLS connection to the upstream, whose certificate it verifies against the "
               "bench CA (no resumption towards the upstream either: it issues no tickets). "
               if REENCRYPT else "in plain to the upstream's plaintext port. ")
            + "`direct` is the client talking TLS to the rustls upstream itself. The proxy runs "
            f"{threads}, rustls with ring; HAProxy: {nbthread}, "
            f"`bind ... ssl crt`; nginx: {workers}, stream `listen ... ssl`, both OpenSSL); the load "
            "generator and the upstream share CPU 1. Here the proxy does the server side of every "
            + ("handshake and the client side of another, and encrypts every byte twice, "
               if REENCRYPT else "handshake, ")
            + "so connection rate and bulk throughput are bounded by the proxy itself. "
            f"Figures are medians of {REPEATS} runs, the targets taken in turn within each run "
            "(idle memory: first run only).",
            "",
        ]
        pairs = (("weir", "haproxy"), ("weir", "nginx"), ("weir", "direct"))
    else:
        lines += [
            "",
            "Passthrough of the same TLS sessions (SNI `bench.test`, full TLS 1.3 handshake each, no resumption) "
            f"to the same rustls upstream. The proxy runs {threads}; "
            f"HAProxy: {nbthread}, `option splice-auto`; nginx: {workers}, `ssl_preread` + `map`); the "
            "load generator and the upstream share CPU 1, so throughput and connection rate are bounded by "
            "them (they do the TLS work) — the proxy's own CPU time is the fairer comparison. "
            f"Figures are medians of {REPEATS} runs, the targets taken in turn within each run "
            "(idle memory: first run only).",
            "",
            "`weir` uses its default relay (`copy`); `weir-auto` is the same gateway with `relay = \"auto\"` "
            "(copy, then `splice(2)` once a direction has carried 64 KiB).",
            "",
        ]
        pairs = (("weir", "bare"), ("weir", "haproxy"), ("weir", "nginx"), ("weir", "direct"),
                 ("weir-auto", "haproxy"))
        lines += [
            "`bare` is the floor: the smallest passthrough relay on weir's own runtime and socket setup "
            "(`weir-bench bare`: read the first bytes, connect, write them, copy both ways; no routing, "
            "limits, timeouts, metrics or log line), so weir ÷ bare is what weir's own work per "
            "connection costs.",
            "",
        ]
        if BASELINE:
            lines += [
                f"`weir-base` is another build (`{BASELINE}`) with `weir`'s config, measured in the same runs.",
                "",
            ]
            pairs += (("weir", "weir-base"),)
    if DEFER:
        lines += [
            "Every proxy's listener has the kernel hold a new connection until its first bytes "
            "(`TCP_DEFER_ACCEPT`): weir `defer_accept = true`, HAProxy `bind ... defer-accept`, "
            + ("nginx `listen ... deferred`." if NGINX_DEFER else
               "but not nginx: its stream module takes `listen ... deferred` from 1.25.5 on, so this nginx "
               "accepts at once."),
            "",
        ]
    header = " | ".join(f"{mine} ÷ {'HAProxy' if other == 'haproxy' else other}" for mine, other in pairs)
    lines += [
        "| metric | " + " | ".join(names) + " | " + header + " |",
        "| --- |" + " --- |" * (len(names) + len(pairs)),
    ]
    for key, label, unit, higher in ROWS:
        values = [results[n].get(key) for n in names]
        if all(v is None for v in values):
            continue
        arrow = "↑" if higher else "↓"
        ratios = []
        for mine, other in pairs:
            value, base = results.get(mine, {}).get(key), results.get(other, {}).get(key)
            ratios.append(f"{value / base:.2f}" if value is not None and base else "–")
        lines.append(f"| {label} ({unit}, {arrow} better) | " + " | ".join(fmt(v) for v in values) + " | " + " | ".join(ratios) + " |")
    added = ", ".join(
        f"{n} {results[n]['serial_p50_us'] - results['direct']['serial_p50_us']:.0f} µs" for n in names if n != "direct"
    )
    lines += [
        "",
        f"Added connect+handshake latency over direct, serial p50: {added}.",
        "",
        "Connection-rate errors (all runs): " + ", ".join(f"{n} {results[n]['rate_errors']}" for n in names) + ".",
        "Idle connections opened (of them, still relaying when all were checked at once): "
        + ", ".join(f"{n} {results[n].get('idle_open', '–')} ({results[n].get('idle_alive', '–')})" for n in names if n != "direct")
        + ".",
        "",
        "Debian's HAProxy and nginx link OpenSSL 3.0"
        + ("; weir uses rustls with ring." if TERMINATE else
           "; in passthrough they do no TLS work, so that does not affect these figures."),
    ]
    return "\n".join(lines) + "\n"


def main():
    WORK.mkdir(parents=True, exist_ok=True)
    write_configs()
    upstream = start_upstream(cpu=1)
    try:
        targets = [
            Target("direct", UPSTREAM[1]),
            Target("weir", 10444, [str(WEIR), "run", "--config", str(WORK / "weir.toml")], version([str(WEIR), "--version"])),
            Target("haproxy", 10445, ["haproxy", "-db", "-f", str(WORK / "haproxy.cfg")], version(["haproxy", "-v"])),
            Target("nginx", 10446, ["nginx", "-c", str(WORK / "nginx.conf"), "-p", str(WORK)], version(["nginx", "-v"])),
        ]
        if not TERMINATE:
            targets.insert(2, Target("weir-auto", 10447, [str(WEIR), "run", "--config", str(WORK / "weir-auto.toml")]))
            bare = [str(BENCH), "bare", "--listen", "127.0.0.1:10455", "--upstream", f"{UPSTREAM[0]}:{UPSTREAM[1]}"]
            targets.insert(1, Target("bare", 10455, bare))
        if BASELINE and not TERMINATE:
            base = [BASELINE, "run", "--config", str(WORK / "weir-base.toml")]
            targets.insert(2, Target("weir-base", 10454, base, version([BASELINE, "--version"])))
        results = measure(targets)
    finally:
        stop(upstream)

    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")), "?")
    facts = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "weir": next(t.version for t in targets if t.name == "weir"),
        "haproxy": next(t.version for t in targets if t.name == "haproxy"),
        "nginx": next(t.version for t in targets if t.name == "nginx"),
        "rustc": version(["rustc", "--version"]),
    }
    text = report(results, targets, facts)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d-%H%M")
    kind = "-reencrypt" if REENCRYPT else "-terminate" if TERMINATE else ""
    kind += f"-workers{WORKERS}" if WORKERS != 1 else ""
    kind += "-defer" if DEFER else ""
    path = RESULTS / f"{stamp}-{facts['commit']}{kind}{'-quick' if QUICK else ''}.md"
    path.write_text(text)
    latest = RESULTS / f"latest{kind}.md"
    latest.write_text(text)
    print(text)
    print(f"written to {path.relative_to(ROOT)} and {latest.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
