#!/usr/bin/env python3
"""Copy against splice(2) for passed-through bulk data, on loopback and off
it: why spliced data reaches the endpoints slower on loopback, and which
relay default is right where the bytes cross a network device.

    bench/run.sh splice [--quick]

Three topologies, each with the same targets (the endpoints without a proxy,
weir with `relay = "copy"`, `"auto"` and `"splice"`, HAProxy with
`option splice-auto`, nginx stream):

- loopback: everything on 127.0.0.1, as in `bench/run.sh`;
- veth: three network namespaces created here (client, proxy, upstream)
  joined by two veth pairs; the kernel's defaults, so TCP hands 64 KiB
  segments to the device (TSO/GSO) and the peer takes them whole;
- veth, 1500-byte frames: the same with segmentation offload off and GRO on
  at every end, as a NIC puts frames on a wire and its driver coalesces them.

The proxy runs on CPU 0 with one thread; the load generator and the TLS
upstream share CPU 1 (they do the TLS work). Reported, medians of the
repeats: MB/s, the proxy's CPU per GiB, the endpoints' (load generator plus
upstream) CPU per GiB, and, off loopback, the TCP segments the upstream's
namespace received per MiB. The direct baseline in the veth topologies is
routed through the proxy namespace by the kernel (IP forwarding), with no
proxy process.
"""

import datetime
import os
import platform
import statistics
import subprocess
import sys
import time

import run as bench

QUICK = "--quick" in sys.argv
REPEATS = 1 if QUICK else 3
BULK_BYTES = (256 << 20) if QUICK else bench.GIB
NS = {"client": "weir-bench-client", "proxy": "weir-bench-proxy", "upstream": "weir-bench-upstream"}
# Proxy-side addresses: the client reaches the proxy on FRONT, the proxy the
# upstream on BACK.
FRONT, CLIENT_ADDR = "10.77.1.1", "10.77.1.2"
BACK, UPSTREAM_ADDR = "10.77.2.1", "10.77.2.2"
# veth ends: (device, namespace).
DEVICES = [("wbc0", "client"), ("wbc1", "proxy"), ("wbu1", "proxy"), ("wbu0", "upstream")]
PORTS = {"weir-copy": 10444, "weir-auto": 10447, "weir-splice": 10449, "haproxy": 10445, "nginx": 10446}
TARGETS = ["direct", "weir-copy", "weir-auto", "weir-splice", "haproxy", "nginx"]


def sh(*args, check=True):
    return subprocess.run([str(a) for a in args], check=check, capture_output=True, text=True)


def in_ns(role):
    """The command prefix that runs in `role`'s namespace (None: here)."""
    return [] if role is None else ["ip", "netns", "exec", NS[role]]


def create_namespaces():
    delete_namespaces()
    for ns in NS.values():
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "link", "add", "wbc0", "netns", NS["client"], "type", "veth", "peer", "name", "wbc1", "netns", NS["proxy"])
    sh("ip", "link", "add", "wbu0", "netns", NS["upstream"], "type", "veth", "peer", "name", "wbu1", "netns", NS["proxy"])
    for dev, role, addr in [("wbc0", "client", CLIENT_ADDR), ("wbc1", "proxy", FRONT),
                            ("wbu1", "proxy", BACK), ("wbu0", "upstream", UPSTREAM_ADDR)]:
        sh("ip", "-n", NS[role], "addr", "add", f"{addr}/24", "dev", dev)
        sh("ip", "-n", NS[role], "link", "set", dev, "up")
    # The direct baseline: the proxy namespace forwards between the two.
    sh("ip", "-n", NS["client"], "route", "add", "default", "via", FRONT)
    sh("ip", "-n", NS["upstream"], "route", "add", "default", "via", BACK)
    sh(*in_ns("proxy"), "sysctl", "-qw", "net.ipv4.ip_forward=1")


def set_frames(wire_sized):
    """Segmentation offload off and GRO on (a NIC's frames), or the defaults."""
    for dev, role in DEVICES:
        state = "off" if wire_sized else "on"
        sh(*in_ns(role), "ethtool", "-K", dev, "tso", state, "gso", state, "gro", "on" if wire_sized else "off")


def delete_namespaces():
    for ns in NS.values():
        sh("ip", "netns", "del", ns, check=False)


def wait_listening(role, port, process, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
        if sh(*in_ns(role), "ss", "-Htln", f"sport = :{port}").stdout.strip():
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def start(role, command, port, log=None):
    process = subprocess.Popen(
        [*in_ns(role), *command], stdout=subprocess.DEVNULL,
        stderr=open(log, "w") if log else subprocess.DEVNULL,
        env={**os.environ, "TOKIO_WORKER_THREADS": "1", "WEIR_LOG": "warn"},
    )
    try:
        wait_listening(role, port, process)
    except BaseException:
        process.kill()
        process.wait()
        raise
    return process


def write_configs(topology, front, upstream):
    """Each proxy's configuration for one topology; returns the commands."""
    work = bench.WORK
    commands = {}
    for mode in ("copy", "auto", "splice"):
        name = f"weir-{mode}"
        config = work / f"splice-{topology}-{name}.toml"
        config.write_text(bench.weir_passthrough(f"{front}:{PORTS[name]}", upstream, relay=mode))
        commands[name] = [str(bench.WEIR), "run", "--config", str(config)]
    haproxy = work / f"splice-{topology}-haproxy.cfg"
    haproxy.write_text(bench.haproxy_passthrough(f"{front}:{PORTS['haproxy']}", upstream))
    commands["haproxy"] = ["haproxy", "-db", "-f", str(haproxy)]
    nginx = work / f"splice-{topology}-nginx.conf"
    nginx.write_text(bench.nginx_passthrough(f"{front}:{PORTS['nginx']}", upstream))
    commands["nginx"] = ["nginx", "-c", str(nginx), "-p", str(work)]
    return commands


def segments_received(role):
    """TCP segments received so far in `role`'s namespace."""
    lines = [l.split() for l in sh(*in_ns(role), "cat", "/proc/net/snmp").stdout.splitlines() if l.startswith("Tcp:")]
    return int(lines[1][lines[0].index("InSegs")])


def bulk(role, target, conns, upstream, proxy, count_segments):
    """One bulk upload; its report with the CPU seconds of the proxy and of
    the endpoints, and the upstream namespace's received segments."""
    proxy_before = bench.cpu_seconds(proxy.pid) if proxy else 0.0
    upstream_before = bench.cpu_seconds(upstream.pid)
    segments_before = segments_received("upstream") if count_segments else 0
    client = subprocess.Popen(
        [*in_ns(role), "taskset", "-c", "1", str(bench.BENCH), "bulk", "--target", target, "--conns", str(conns),
         "--bytes", str(BULK_BYTES), "--ca", str(bench.WORK / "ca.pem")],
        stdout=subprocess.PIPE, text=True,
    )
    out = client.stdout.read()
    _, status, usage = os.wait4(client.pid, 0)
    client.returncode = os.waitstatus_to_exitcode(status)
    if client.returncode != 0:
        raise RuntimeError(f"bulk against {target} exited with {client.returncode}")
    report = bench.json.loads(out.strip().splitlines()[-1])
    gib = report["bytes"] / bench.GIB
    figures = {
        f"bulk{conns}_mbps": report["mb_per_s"],
        f"bulk{conns}_endpoints_ms_per_gib":
            (usage.ru_utime + usage.ru_stime + bench.cpu_seconds(upstream.pid) - upstream_before) / gib * 1000,
    }
    if proxy:
        figures[f"bulk{conns}_proxy_ms_per_gib"] = (bench.cpu_seconds(proxy.pid) - proxy_before) / gib * 1000
    if count_segments:
        figures[f"bulk{conns}_segments_per_mib"] = (segments_received("upstream") - segments_before) / (gib * 1024)
    return figures


def measure(topology):
    """Every target in `topology`, REPEATS rounds, the targets in turn."""
    on_veth = topology != "loopback"
    client_role, proxy_role, upstream_role = ("client", "proxy", "upstream") if on_veth else (None, None, None)
    front = FRONT if on_veth else "127.0.0.1"
    upstream_host = UPSTREAM_ADDR if on_veth else bench.UPSTREAM[0]
    upstream_addr = f"{upstream_host}:{bench.UPSTREAM[1]}"
    commands = write_configs(topology, front, upstream_addr)
    upstream = start(upstream_role, ["taskset", "-c", "1", str(bench.BENCH), "upstream", "--listen", upstream_addr,
                                     "--dir", str(bench.WORK)], bench.UPSTREAM[1])
    samples = {name: [] for name in TARGETS}
    try:
        for round_ in range(REPEATS):
            for name in TARGETS:
                print(f"== {topology}, run {round_ + 1}/{REPEATS}: {name}", flush=True)
                proxy = None
                if name != "direct":
                    proxy = start(proxy_role, ["taskset", "-c", "0", *commands[name]], PORTS[name],
                                  log=bench.WORK / f"splice-{topology}-{name}.log")
                target = upstream_addr if proxy is None else f"{front}:{PORTS[name]}"
                try:
                    figures = {}
                    for conns in (1, 64):
                        figures.update(bulk(client_role, target, conns, upstream, proxy, on_veth))
                    samples[name].append(figures)
                finally:
                    if proxy:
                        bench.stop(proxy)
    finally:
        bench.stop(upstream)
    return {name: {k: statistics.median(run[k] for run in runs) for k in runs[0]} for name, runs in samples.items()}


ROWS = [
    ("bulk1_mbps", "bulk, 1 connection (MB/s, ↑ better)"),
    ("bulk64_mbps", "bulk, 64 connections (MB/s, ↑ better)"),
    ("bulk1_proxy_ms_per_gib", "proxy CPU per GiB, 1 connection (ms, ↓ better)"),
    ("bulk64_proxy_ms_per_gib", "proxy CPU per GiB, 64 connections (ms, ↓ better)"),
    ("bulk1_endpoints_ms_per_gib", "endpoints' CPU per GiB, 1 connection (ms, ↓ better)"),
    ("bulk64_endpoints_ms_per_gib", "endpoints' CPU per GiB, 64 connections (ms, ↓ better)"),
    ("bulk1_segments_per_mib", "segments into the upstream's namespace per MiB, 1 connection"),
    ("bulk64_segments_per_mib", "segments into the upstream's namespace per MiB, 64 connections"),
]


def fmt(value):
    if value is None:
        return "–"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.1f}"


def table(results):
    lines = ["| metric | " + " | ".join(TARGETS) + " | weir-auto ÷ nginx | weir-splice ÷ weir-copy |",
             "| --- |" + " --- |" * (len(TARGETS) + 2)]
    for key, label in ROWS:
        values = [results[name].get(key) for name in TARGETS]
        if all(v is None for v in values):
            continue
        ratio = lambda a, b: "–" if a is None or not b else f"{a / b:.2f}"
        auto, nginx = results["weir-auto"].get(key), results["nginx"].get(key)
        splice, copy = results["weir-splice"].get(key), results["weir-copy"].get(key)
        lines.append(f"| {label} | " + " | ".join(fmt(v) for v in values)
                     + f" | {ratio(auto, nginx)} | {ratio(splice, copy)} |")
    return "\n".join(lines)


def main():
    bench.WORK.mkdir(parents=True, exist_ok=True)
    results = {}
    try:
        results["loopback"] = measure("loopback")
        create_namespaces()
        set_frames(wire_sized=False)
        results["veth"] = measure("veth")
        set_frames(wire_sized=True)
        results["veth-frames"] = measure("veth-frames")
    finally:
        delete_namespaces()
    now = datetime.datetime.now(datetime.timezone.utc)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    titles = {
        "loopback": "Loopback (127.0.0.1)",
        "veth": "veth pairs between three namespaces, kernel defaults (64 KiB segments cross the devices)",
        "veth-frames": "veth pairs, 1500-byte frames (TSO/GSO off, GRO on at every end)",
    }
    text = f"""# Copy against splice for passed-through bulk data, on loopback and over veth — {now:%Y-%m-%d %H:%M UTC}

Produced by `bench/run.sh splice{' --quick' if QUICK else ''}` at commit `{bench.commit()}` on {cpu}, {os.cpu_count()} cores, kernel {platform.release()}.

{len(TARGETS) - 1} proxies and the direct path, {BULK_BYTES >> 20} MiB uploaded over TLS 1.3 per run (the proxies pass it through), medians of {REPEATS} runs. The proxy runs on CPU 0 with one thread; the load generator and the upstream share CPU 1 and do the TLS work, so MB/s is bounded by CPU 1: the endpoints' CPU per GiB says how hard a proxy's way of sending makes their work. weir's `auto` copies the first 64 KiB of each direction, then splices; `splice` splices from the first byte; HAProxy runs `option splice-auto`; nginx copies.
"""
    for topology, title in titles.items():
        text += f"\n## {title}\n\n{table(results[topology])}\n"
    bench.RESULTS.mkdir(parents=True, exist_ok=True)
    path = bench.RESULTS / f"splice-{now:%Y-%m-%d-%H%M}-{bench.commit()}{'-quick' if QUICK else ''}.md"
    path.write_text(text)
    (bench.RESULTS / "latest-splice.md").write_text(text)
    print(text)
    print(f"written to {path.relative_to(bench.ROOT)}")


if __name__ == "__main__":
    main()
