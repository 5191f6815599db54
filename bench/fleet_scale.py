"""Fleet mode at scale on one machine: one etcd member (Debian's etcd-server)
and N real `weir run` nodes on loopback (release build, one compiled-code
cache shared by all), for each N given. Over a stream of publishes, each
changing a route, measures

- publish to the last node serving it: from `weir publish` printing the
  revision to the last node's `fleet revision applied` log line, p50 / p99 /
  max over the publishes;
- etcd's watch events and the bytes it sent to its clients, per publish
  (`etcd_debugging_mvcc_events_total`, `etcd_network_client_grpc_sent_bytes_total`);
- etcd's CPU time per publish, and each node's (user + system, from /proc);
- the nodes' resident memory (mean and max, after the stream);
- etcd stopped for `--outage` seconds (default 7) and started again: from its answering a health
  check to each node reading it again, then a publish to the last node
  serving it.

Writes a report under bench/results/fleet-scale-*.md.

    bench/run.sh fleet-scale [--nodes 10,50,200] [--publishes N] [--outage S] [--weir BIN]

`--weir` runs the nodes and the publisher from another weir binary (an
earlier commit's), for the figures of the same stream before a change.
"""
import datetime, os, pathlib, queue, re, shutil, socket, statistics, subprocess, sys, tempfile, threading, time

root = pathlib.Path(__file__).resolve().parent.parent


def arg(name, default):
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


weir = arg("--weir", str(root / "target" / "release" / "weir"))
sizes = [int(n) for n in arg("--nodes", "10,50,200").split(",")]
publishes = int(arg("--publishes", "20"))
outage = float(arg("--outage", "7"))
wasm = root / "target" / "wasm32-wasip2" / "release" / "static_router.wasm"
clock = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / clock


def rss_kib(pid):
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def metric(endpoint, name):
    import urllib.request
    text = urllib.request.urlopen(f"{endpoint}/metrics", timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{"))


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def run(n, work):
    client, peer = free_port(), free_port()
    endpoint = f"http://127.0.0.1:{client}"
    def start_etcd():
        etcd = subprocess.Popen(
            ["etcd", "--data-dir", str(work / "etcd"), "--listen-client-urls", endpoint, "--advertise-client-urls", endpoint,
             "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-cluster", f"default=http://127.0.0.1:{peer}", "--logger", "zap", "--log-level", "warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            if subprocess.run(["etcdctl", "--endpoints", endpoint, "endpoint", "health"], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        return etcd

    etcd = start_etcd()
    nodes = []
    try:

        def config(i):
            path = work / f"v{i}.toml"
            path.write_text(f'''
[listeners.public]
bind = "127.0.0.1:0"
plugins = ["router"]
[plugins.router]
wasm = "{wasm}"
config.routes."app.example.com" = {{ address = "127.0.0.1:{9 + i % 2}" }}
[cache]
dir = "{work / 'cache'}"
''')
            return path

        def publish(path):
            """Publishes; returns (revision, when its revision line was printed)."""
            p = subprocess.Popen([weir, "publish", "--config", str(path), "--etcd", endpoint], stdout=subprocess.PIPE,
                                 text=True, env={**os.environ, "WEIR_LOG": "warn"})
            revision = at = None
            for line in p.stdout:
                if line.startswith("published"):
                    at = time.time()
                    revision = int(re.search(r"as revision (\d+)", line).group(1))
            assert p.wait() == 0 and revision is not None
            return revision, at

        applied, reconnected = queue.Queue(), queue.Queue()

        def follow(name, stream):
            for line in stream:
                m = re.search(r"^(\S+)Z .*fleet revision applied revision=(\d+)", line)
                if m:
                    at = datetime.datetime.fromisoformat(m.group(1) + "+00:00").timestamp()
                    applied.put((name, int(m.group(2)), at))
                m = re.search(r"^(\S+)Z .*etcd can be read again", line)
                if m:
                    reconnected.put(datetime.datetime.fromisoformat(m.group(1) + "+00:00").timestamp())

        def wait_applied(revision, timeout=120):
            seen, deadline = {}, time.time() + timeout
            while len(seen) < n:
                name, rev, at = applied.get(timeout=max(0.1, deadline - time.time()))
                if rev >= revision:
                    seen.setdefault(name, at)
            return seen

        first, _ = publish(config(0))
        for i in range(n):
            file = work / f"node{i}.toml"
            file.write_text(f'''
[fleet]
endpoints = ["{endpoint}"]
node = "node{i}"
state_dir = "{work / f'state{i}'}"
[cache]
dir = "{work / 'cache'}"
''')
            p = subprocess.Popen([weir, "run", "--config", str(file)], stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "NO_COLOR": "1", "WEIR_LOG": "info"})
            nodes.append(p)
            threading.Thread(target=follow, args=(f"node{i}", p.stderr), daemon=True).start()
        wait_applied(first, timeout=600)
        time.sleep(2)

        events0 = metric(endpoint, "etcd_debugging_mvcc_events_total")
        bytes0 = metric(endpoint, "etcd_network_client_grpc_sent_bytes_total")
        cpu0 = cpu_seconds(etcd.pid)
        nodes_cpu0 = sum(cpu_seconds(p.pid) for p in nodes)
        last = []
        for i in range(1, publishes + 1):
            revision, at = publish(config(i))
            seen = wait_applied(revision)
            last.append((max(seen.values()) - at) * 1000)
        time.sleep(1)
        events = (metric(endpoint, "etcd_debugging_mvcc_events_total") - events0) / publishes
        sent = (metric(endpoint, "etcd_network_client_grpc_sent_bytes_total") - bytes0) / publishes
        # etcd's CPU includes the publisher's own requests and the nodes'
        # lease keep-alives over the stream.
        cpu = (cpu_seconds(etcd.pid) - cpu0) / publishes
        node_cpu = (sum(cpu_seconds(p.pid) for p in nodes) - nodes_cpu0) / publishes / n
        rss = [rss_kib(p.pid) for p in nodes]
        # etcd away for `outage` seconds, then back: from etcd answering its health
        # check to each node reading it again (nodes that stayed up, trying
        # again on their own), then a publish to the last node serving it.
        etcd.terminate()
        etcd.wait()
        time.sleep(outage)
        etcd = start_etcd()
        back = time.time()
        again = [(reconnected.get(timeout=60) - back) * 1000 for _ in range(n)]
        revision, at = publish(config(publishes + 1))
        seen = wait_applied(revision)
        return {
            "again_p50": pct(again, 50), "again_max": max(again), "returned": (max(seen.values()) - at) * 1000,
            "n": n, "p50": pct(last, 50), "p99": pct(last, 99), "max": max(last),
            "events": events, "bytes": sent, "cpu": cpu * 1000, "node_cpu": node_cpu * 1000,
            "rss_mean": statistics.mean(rss) / 1024, "rss_max": max(rss) / 1024,
        }
    finally:
        for p in nodes:
            p.terminate()
        for p in nodes:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        etcd.terminate()
        etcd.wait()


rows = []
for n in sizes:
    work = pathlib.Path(tempfile.mkdtemp())
    os.chmod(work, 0o700)
    try:
        rows.append(run(n, work))
        print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True).stdout.strip()
commit += "+changes" if dirty else ""
binary = "" if "--weir" not in sys.argv else f"-with-{pathlib.Path(weir).name}"
version = subprocess.run(["etcdctl", "version"], capture_output=True, text=True).stdout.split()[2]
now = datetime.datetime.now(datetime.timezone.utc)
lines = [
    f"# Fleet at scale: one etcd member and N nodes — {now:%Y-%m-%d %H:%M} UTC",
    "",
    f"Commit {commit}; nodes and publisher: `{weir}`; etcd {version}; {os.cpu_count()} CPUs, every node",
    f"and etcd on this machine. {publishes} publishes a row, each changing a route and waited out",
    "before the next.",
    "",
    "| nodes | publish → last node serving p50 / p99 / max | etcd watch events / publish | etcd bytes sent / publish | etcd CPU / publish | node CPU / publish | node RSS mean / max | etcd back → nodes reading it p50 / max | then a publish → last node serving |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
]
for r in rows:
    lines.append(
        f"| {r['n']} | {r['p50']:.0f} / {r['p99']:.0f} / {r['max']:.0f} ms | {r['events']:.0f} ({r['events'] / r['n']:.2f} N) | "
        f"{r['bytes'] / 1024:.0f} KiB | {r['cpu']:.1f} ms | {r['node_cpu']:.1f} ms | {r['rss_mean']:.1f} / {r['rss_max']:.1f} MiB | {r['again_p50']:.0f} / {r['again_max']:.0f} ms | {r['returned']:.0f} ms |")
lines += [
    "",
    "Publish to serving runs from the publisher printing the revision (its transaction done) to the last node's",
    "`fleet revision applied` log line; both clocks are this machine's. With N nodes and etcd on 2",
    "cores, the figure includes N processes woken at once to read and rebuild. etcd's bytes per publish",
    "include the publisher reading back the component it names (a publish checks what etcd holds).",
    f"etcd back: etcd stopped for {outage:g} s, then from `etcdctl endpoint health` passing (polled every",
    "100 ms, so a node may be first: a negative figure) to each node's `etcd can be read again` log line.",
    "",
]
report = "\n".join(lines)
out = root / "bench" / "results" / f"fleet-scale-{now:%Y-%m-%d-%H%M}-{commit}{binary}.md"
out.write_text(report)
print(report)
print(f"written to {out}")
