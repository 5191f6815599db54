#!/usr/bin/env python3
"""Tenant isolation: what a bystander tenant's clients see while another
tenant attacks the node through its plugin, its shadows, its DNS lookups or
health checks.

One weir, two tenants on one listener. `calm.test` is routed by
static-router, passing through to the benchmark upstream; a calm client
connects serially and times each TLS handshake through weir (connect to
handshake done). The attacks, each against `loop.test` or the node:

- `loops`: its plugin (misbehave, mode `loop`) spins to its 10 ms deadline
  on every call, an attacker opening --rate connections a second;
- `refuses`: the control, the same connections to a plugin that refuses at
  once (what the attack's connections cost by themselves);
- `shadows`: its live plugin refuses at once and its two shadows (its
  `max_shadows`) spin to their deadline on every connection;
- `dns`: its plugin (dstack-router, `dns_custom_domains`) looks up a TXT
  record for every connection, the resolver a port that refuses;
- `probes`: three pools of 10,000 servers each, probed every 100 ms with a
  1 s timeout, at a listener that never accepts (every connect hangs), no
  attacking connections;
- `republish`: its plugin's component is replaced by a new one (the same
  plugin with a custom section of its own, so each is compiled) and the node
  reloaded (`POST /api/reload`), again as soon as each reload returns, no
  attacking connections. What a tenant republishing in a loop costs the
  node's CPU (in fleet mode `compile_per_minute` then refuses the rest).

Each with weir at 1 worker thread and at the default (one per CPU), beside
a quiet row. Reported: the calm tenant's handshake p50 / p99 / max and
failures, the attacked plugin's failures by kind (timeouts ran, budget
refusals did not), weir's CPU and its most descriptors open. The goal: in
every attacked row the calm p99 at most twice the quiet p99, and no calm
connection failed.

Started by `bench/run.sh isolation [--rate N] [--seconds N]`.
"""

import datetime
import os
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

import run as bench


def option(name, default):
    return type(default)(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default


RATE = option("--rate", 200)
# Another weir binary to measure with the same setup (an older build, say).
WEIR = option("--weir", str(bench.WEIR))
SECONDS = option("--seconds", 10.0)
ADMIN = "127.0.0.1:10450"
CONFIG = bench.WORK / "isolation.toml"
MISBEHAVE = bench.ROOT / "target" / "wasm32-wasip2" / "release" / "misbehave.wasm"
CALM_PAUSE = 0.01


DSTACK = bench.ROOT / "target" / "wasm32-wasip2" / "release" / "dstack_router.wasm"
# A UDP port nothing answers on (the DNS attack's resolver) and the black
# hole the probe storm aims at.
DNS_PORT = 10453
HOLE_PORT = 10452
REPUBLISHED = bench.WORK / "isolation-republished.wasm"
ATTACKS = ("refuses", "loops", "shadows", "dns", "probes", "republish")


def marked_component(wasm, mark):
    """`wasm` with a custom section carrying `mark`: new bytes, one more compile."""
    name, payload = b"weir-bench", mark.encode()
    body = bytes([len(name)]) + name + payload
    assert len(body) < 128
    return wasm.read_bytes() + bytes([0, len(body)]) + body


def republisher(stop, sent):
    """A new component for tenant `loop` and a reload, as fast as they go."""
    while not stop.is_set():
        # Marked with the time too: a compiled-code cache filled by a run
        # before would otherwise be hit.
        REPUBLISHED.write_bytes(marked_component(MISBEHAVE, f"{time.time_ns()}-{sent[0]}"))
        request = urllib.request.Request(
            f"http://{ADMIN}/api/reload", data=b"{}", method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            urllib.request.urlopen(request, timeout=120).read()
        except OSError:
            pass
        sent[0] += 1


def write_config(attack):
    """The two tenants, the attacked one set up for `attack` (`quiet`: as
    for `loops`, with no attacker)."""
    spin = f'wasm = "{MISBEHAVE}"\nconfig = {{ mode = "loop" }}\ntimeout = "10ms"'
    refuse = f'wasm = "{bench.PLUGIN}"\nconfig.default = {{ reject = "closed" }}\ntimeout = "10ms"'
    extra, grants = "", ""
    if attack in ("quiet", "loops"):
        looper = spin
    elif attack == "shadows":
        looper = refuse
        for n in (1, 2):
            extra += f'\n[plugins.looper-next{n}]\n{spin}\nshadow_of = "looper"\n'
    elif attack == "dns":
        looper = f'wasm = "{DSTACK}"\ngrants = ["dns"]\ntimeout = "10ms"\nconfig.dns_custom_domains = true'
        grants = 'grants = ["dns"]'
        extra += f'\n[resolver]\nservers = ["127.0.0.1:{DNS_PORT}"]\n'
    elif attack == "republish":
        REPUBLISHED.write_bytes(marked_component(MISBEHAVE, f"{time.time_ns()}-start"))
        looper = f'wasm = "{REPUBLISHED}"\nconfig = {{ mode = "loop" }}\ntimeout = "10ms"'
    else:
        looper = refuse
    if attack == "probes":
        for p in range(3):
            servers = ", ".join(f'"127.{20 + p}.{i // 250}.{i % 250 + 1}:{HOLE_PORT}"' for i in range(10_000))
            extra += f'\n[pools.storm{p}]\nservers = [{servers}]\nhealth = {{ interval = "100ms", timeout = "1s" }}\n'
    CONFIG.write_text(f"""
[listeners.public]
bind = "127.0.0.1:10444"
plugins = ["edge"]

[plugins.edge]
wasm = "{bench.PLUGIN}"
config.default = {{ reject = "no tenant owns this name" }}

[plugins.looper]
{looper}
{extra}
[plugins.calm-router]
wasm = "{bench.PLUGIN}"
config.default = {{ pool = "calm" }}

[pools.calm]
servers = ["{bench.UPSTREAM[0]}:{bench.UPSTREAM[1]}"]

[tenants.loop]
domains = ["loop.test"]
plugins = ["looper"]
{grants}

[tenants.calm]
domains = ["calm.test"]
plugins = ["calm-router"]
pools = ["calm"]

[admin]
bind = "{ADMIN}"

[reload]
watch = false
""")


def context():
    ctx = ssl.create_default_context()
    # Latency, not trust: the upstream's certificate names bench.test.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def calm_client(stop, samples, failures):
    """Serial handshakes to the calm tenant until `stop` is set."""
    ctx = context()
    while not stop.is_set():
        started = time.perf_counter()
        try:
            with socket.create_connection(("127.0.0.1", 10444), timeout=5) as raw:
                with ctx.wrap_socket(raw, server_hostname="app.calm.test") as tls:
                    tls.do_handshake()
            samples.append(time.perf_counter() - started)
        except OSError as e:
            failures.append(str(e))
        time.sleep(CALM_PAUSE)


def client_hello(name):
    """The first flight a TLS client sends for `name`, built once."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context().wrap_bio(incoming, outgoing, server_hostname=name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def attacker(stop, rate, sent):
    """`rate` connections a second to the looping tenant, each a real
    ClientHello for `x.loop.test`, replayed (weir refuses the connection).
    Runs in a process of its own (`--attacker`), and sends bytes built once,
    so that the load generator's own CPU does not delay the calm client."""
    hello = client_hello("x.loop.test")

    def one():
        try:
            with socket.create_connection(("127.0.0.1", 10444), timeout=5) as raw:
                raw.sendall(hello)
                while raw.recv(4096):
                    pass
        except OSError:
            pass

    interval = 1.0 / rate
    next_at = time.perf_counter()
    while not stop.is_set():
        threading.Thread(target=one, daemon=True).start()
        sent[0] += 1
        next_at += interval
        time.sleep(max(0.0, next_at - time.perf_counter()))


def failures_by_kind():
    """The attacked tenant's plugin failures (its shadows' included), by kind."""
    text = urllib.request.urlopen(f"http://{ADMIN}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith('weir_plugin_failures_total{plugin="looper') or line.startswith(
            'weir_shadow_decisions_total{plugin="looper'
        ):
            kind = line.split('kind="')[1].split('"')[0] if 'kind="' in line else "shadow-" + line.split('result="')[1].split('"')[0]
            out[kind] = out.get(kind, 0) + float(line.rsplit(" ", 1)[1])
    return out


def descriptors(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def percentile(samples, p):
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


def run_once(workers, rate, attack):
    write_config(attack)
    env = {**os.environ, "WEIR_LOG": "warn"}
    if workers:
        env["TOKIO_WORKER_THREADS"] = str(workers)
    upstream = bench.start_upstream(cpu=1)
    hole = None
    if attack == "probes":
        # Listening on every loopback address, never accepting, the smallest
        # backlog: once its queue is full, SYNs go unanswered.
        hole = socket.socket()
        hole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        hole.bind(("0.0.0.0", HOLE_PORT))
        hole.listen(0)
    weir = bench.started(
        [WEIR, "run", "--config", str(CONFIG)], 10444,
        stdout=subprocess.DEVNULL, stderr=open(bench.WORK / "isolation-weir.log", "w"), env=env,
    )
    most = [0]
    try:
        time.sleep(0.5 if attack != "probes" else 2.0)
        stop = threading.Event()
        samples, failures, sent = [], [], [0]
        cpu_before = bench.cpu_seconds(weir.pid)
        threads = [threading.Thread(target=calm_client, args=(stop, samples, failures))]

        def watch_descriptors():
            while not stop.is_set():
                most[0] = max(most[0], descriptors(weir.pid))
                time.sleep(0.05)

        threads.append(threading.Thread(target=watch_descriptors))
        if attack == "republish":
            threads.append(threading.Thread(target=republisher, args=(stop, sent)))
        attack_process = None
        if rate:
            attack_process = subprocess.Popen(
                [sys.executable, __file__, "--attacker", str(rate), "--seconds", str(SECONDS)],
                stdout=subprocess.PIPE, text=True,
            )
        for thread in threads:
            thread.start()
        time.sleep(SECONDS)
        stop.set()
        for thread in threads:
            thread.join()
        if attack_process:
            sent[0] = int(attack_process.communicate(timeout=60)[0].strip() or 0)
        cpu = bench.cpu_seconds(weir.pid) - cpu_before
        kinds = failures_by_kind()
    finally:
        bench.stop(weir, upstream)
        if hole:
            hole.close()
    return {
        "workers": workers or "default",
        "rate": rate,
        "attack": attack,
        "attempts": sent[0],
        "calm": len(samples),
        "failed": len(failures),
        "p50": statistics.median(samples) * 1e3 if samples else None,
        "p99": percentile(samples, 0.99) * 1e3 if samples else None,
        "max": max(samples) * 1e3 if samples else None,
        "timeouts": kinds.get("timeout", 0),
        "budget": kinds.get("budget", 0),
        "cpu": cpu,
        "descriptors": most[0],
    }


def attack_main(rate):
    stop, sent = threading.Event(), [0]
    thread = threading.Thread(target=attacker, args=(stop, rate, sent))
    thread.start()
    time.sleep(SECONDS)
    stop.set()
    thread.join()
    print(sent[0])


def main():
    if "--attacker" in sys.argv:
        return attack_main(option("--attacker", RATE))
    bench.WORK.mkdir(parents=True, exist_ok=True)
    rows = []
    only = option("--attacks", ",".join(ATTACKS)).split(",")
    for workers in (1, None):
        for attack in ("quiet", *[a for a in ATTACKS if a in only]):
            rate = 0 if attack in ("quiet", "probes", "republish") else RATE
            row = run_once(workers, rate, attack)
            print(row, flush=True)
            rows.append(row)
    commit = bench.commit() if WEIR == str(bench.WEIR) else f"{bench.commit()}-with-{os.path.basename(WEIR)}"
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [
        f"# Tenant isolation, {now:%Y-%m-%d %H:%M} UTC, commit {commit}",
        "",
        f"`bench/run.sh isolation --rate {RATE} --seconds {SECONDS:g}` on {os.cpu_count()} CPUs. "
        "Attacks: `loops`, tenant `loop`'s plugin spins to its 10 ms deadline on every call; `refuses`, the same "
        "connections to a plugin that refuses at once (the control); `shadows`, its live plugin refuses and its two "
        "shadows spin; `dns`, dstack-router looks up a TXT record for every connection (the resolver refuses); "
        "`probes`, three pools of 10,000 servers probed every 100 ms (1 s timeout) at a listener that never accepts; "
        "`republish`, tenant `loop`'s component replaced by a new one and the node reloaded as soon as each reload returns "
        "(attack connections: the reloads). "
        "Default budgets (`plugin_cpu = \"100ms\"`, `max_plugin_calls` 4 or one per worker, shadows included; "
        "`dns_queries_per_second` 200; 256 probes in flight). Tenant `calm` passes through to the benchmark "
        f"upstream. The calm client handshakes serially through weir (pausing {CALM_PAUSE * 1e3:g} ms between); "
        "the attacker (a process of its own) opens the given number of connections a second to the attacked tenant, each sending a real ClientHello built once. Handshake times "
        "are a Python client's (connect to handshake done), including the upstream's TLS work.",
        "",
        "| weir workers | attack | attack conn/s | attack connections | calm handshakes | calm failed | calm p50 ms | calm p99 ms | calm max ms | plugin timeouts (ran) | refused over budget | weir CPU s | most descriptors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['workers']} | {r['attack']} | {r['rate']} | {r['attempts']} | {r['calm']} | {r['failed']} | "
            f"{r['p50']:.2f} | {r['p99']:.2f} | {r['max']:.2f} | {r['timeouts']:.0f} | {r['budget']:.0f} | {r['cpu']:.2f} | {r['descriptors']} |"
        )
    verdicts = []
    for workers in (1, "default"):
        quiet = next(r for r in rows if r["workers"] == workers and r["attack"] == "quiet")
        lines.append("")
        for loud in (r for r in rows if r["workers"] == workers and r["attack"] not in ("quiet", "refuses")):
            ratio = loud["p99"] / quiet["p99"]
            met = ratio <= 2.0 and loud["failed"] == 0
            verdicts.append(met)
            lines.append(
                f"- {workers} worker(s), `{loud['attack']}`: calm p99 {loud['p99']:.2f} ms under attack vs {quiet['p99']:.2f} ms quiet "
                f"= {ratio:.2f}x, {loud['failed']} failed: goal (<= 2x, none failed) {'met' if met else 'NOT met'}."
            )
        control = next((r for r in rows if r["workers"] == workers and r["attack"] == "refuses"), None)
        if control:
            lines.append(
                f"- {workers} worker(s), control (`refuses`): calm p99 {control['p99']:.2f} ms "
                f"({control['p99'] / quiet['p99']:.2f}x): the part of the rise the attack's connections cause by themselves."
            )
    text = "\n".join(lines) + "\n"
    bench.RESULTS.mkdir(parents=True, exist_ok=True)
    path = bench.RESULTS / f"isolation-{now:%Y-%m-%d-%H%M}-{commit}.md"
    path.write_text(text)
    (bench.RESULTS / "latest-isolation.md").write_text(text)
    print(text)
    print(f"report: {path}")
    sys.exit(0 if all(verdicts) else 1)


if __name__ == "__main__":
    main()
