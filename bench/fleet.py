"""Fleet mode on one machine: a single etcd member (Debian's etcd-server) and
three weir nodes on loopback, release build. Measures

- publish to applied: from the moment `weir publish` prints the revision
  (just after its transaction) to each node's log line saying it applied
  that revision, over a series of publishes that each change a route;
- the etcd storage a config with 1,000 routes takes (the value, and the
  growth of etcd's database);
- applying a revision that brings a component no node has compiled yet
  (mesh-router, 1.8 MB): fetched in chunks, checked, compiled, swapped in.

Writes a report under bench/results/.

    bench/run.sh fleet [--publishes N]
"""
import datetime, json, os, pathlib, queue, re, shutil, socket, statistics, subprocess, sys, tempfile, threading, time

root = pathlib.Path(__file__).resolve().parent.parent
weir = str(root / "target" / "release" / "weir")
wasm = root / "target" / "wasm32-wasip2" / "release"
publishes = int(sys.argv[sys.argv.index("--publishes") + 1]) if "--publishes" in sys.argv else 50
work = pathlib.Path(tempfile.mkdtemp())
os.chmod(work, 0o700)
procs = []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


client, peer = free_port(), free_port()
endpoint = f"http://127.0.0.1:{client}"
procs.append(subprocess.Popen(
    ["etcd", "--data-dir", str(work / "etcd"), "--listen-client-urls", endpoint, "--advertise-client-urls", endpoint,
     "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
     "--initial-cluster", f"default=http://127.0.0.1:{peer}", "--logger", "zap", "--log-level", "warn"],
    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))


def etcdctl(*args):
    return subprocess.run(["etcdctl", "--endpoints", endpoint, *args], check=True, capture_output=True, text=True).stdout


for _ in range(100):
    if subprocess.run(["etcdctl", "--endpoints", endpoint, "endpoint", "health"], capture_output=True).returncode == 0:
        break
    time.sleep(0.1)


def config(name, routes=1, target="127.0.0.1:9", plugin="static_router.wasm", extra=""):
    lines = [f'config.routes."app{i}.example.com" = {{ address = "{target}" }}' for i in range(routes)]
    text = f'''
[listeners.public]
bind = "127.0.0.1:0"
plugins = ["router"]
[plugins.router]
wasm = "{wasm / plugin}"
{chr(10).join(lines)}
{extra}
[cache]
dir = "{work / 'publisher-cache'}"
'''
    path = work / name
    path.write_text(text)
    return path


def publish(path):
    """Publishes; returns (revision, the time its revision line was printed)."""
    p = subprocess.Popen([weir, "publish", "--config", str(path), "--etcd", endpoint], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "WEIR_LOG": "warn"})
    for line in p.stdout:
        if line.startswith("published"):
            at = time.time()
            revision = int(re.search(r"as revision (\d+)", line).group(1))
    p.wait()
    assert p.returncode == 0
    return revision, at


applied = queue.Queue()


def follow(name, stream):
    for line in stream:
        m = re.search(r"^(\S+)Z .*fleet revision applied revision=(\d+)", line)
        if m:
            at = datetime.datetime.fromisoformat(m.group(1) + "+00:00").timestamp()
            applied.put((name, int(m.group(2)), at))


publish(config("v0.toml"))
for n in range(3):
    node = work / f"node{n}.toml"
    node.write_text(f'''
[fleet]
endpoints = ["{endpoint}"]
node = "node{n}"
state_dir = "{work / f'state{n}'}"
[cache]
dir = "{work / f'cache{n}'}"
''')
    p = subprocess.Popen([weir, "run", "--config", str(node)], stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "NO_COLOR": "1", "WEIR_LOG": "info"})
    procs.append(p)
    threading.Thread(target=follow, args=(f"node{n}", p.stderr), daemon=True).start()
time.sleep(2)


def wait_applied(revision, timeout=60):
    seen, deadline = {}, time.time() + timeout
    while len(seen) < 3:
        name, rev, at = applied.get(timeout=max(0.1, deadline - time.time()))
        if rev >= revision:
            seen[name] = at
    return seen


latencies, last = [], []
for i in range(publishes):
    revision, at = publish(config(f"v{i % 2 + 1}.toml", target=f"127.0.0.1:{9 + i % 2}"))
    seen = wait_applied(revision)
    latencies.extend((t - at) * 1000 for t in seen.values())
    last.append((max(seen.values()) - at) * 1000)

before = json.loads(etcdctl("endpoint", "status", "-w", "json"))[0]["Status"].get("dbSizeInUse", 0)
revision, at = publish(config("routes.toml", routes=1000))
wait_applied(revision)
value = len(json.loads(etcdctl("get", "/weir/config", "-w", "json"))["kvs"][0]["value"]) * 3 // 4
after = json.loads(etcdctl("endpoint", "status", "-w", "json"))[0]["Status"].get("dbSizeInUse", 0)

mesh = config("mesh.toml", plugin="mesh_router.wasm", extra=f'config_file = "{root / "examples" / "mesh" / "dynamic.yml"}"')
mesh.write_text(mesh.read_text().replace('config.routes."app0.example.com" = { address = "127.0.0.1:9" }', ""))
revision, at = publish(mesh)
seen = wait_applied(revision)
component = [(t - at) * 1000 for t in seen.values()]
mesh_bytes = (wasm / "mesh_router.wasm").stat().st_size

for p in procs:
    p.terminate()
for p in procs:
    p.wait()
shutil.rmtree(work)


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True).stdout.strip()
commit += "+changes" if dirty else ""
now = datetime.datetime.now(datetime.timezone.utc)
report = "\n".join([
    f"# Fleet mode, one etcd member and three nodes — {now:%Y-%m-%d %H:%M} UTC",
    "",
    f"Commit {commit}; weir release build; etcd {etcdctl('version').split()[2]}; "
    f"{os.cpu_count()} CPUs, everything on this machine.",
    "",
    "| measure | value |",
    "| --- | --- |",
    f"| publish to applied, each node ({len(latencies)} samples): p50 / p99 / max | "
    f"{pct(latencies, 50):.1f} / {pct(latencies, 99):.1f} / {max(latencies):.1f} ms |",
    f"| publish to the last of 3 nodes applied ({len(last)} publishes): p50 / p99 | "
    f"{pct(last, 50):.1f} / {pct(last, 99):.1f} ms |",
    f"| `config` value with 1,000 routes | {value / 1024:.0f} KiB |",
    f"| etcd database in use grows by (dbSizeInUse) | {(after - before) / 1024:.0f} KiB |",
    f"| a revision with mesh-router ({mesh_bytes / 1e6:.1f} MB) no node had compiled: publish to applied, per node (the three compiling at once on 2 cores) | "
    + " / ".join(f"{c:.0f}" for c in sorted(component)) + " ms |",
    "",
    "Publish to applied is measured from the publisher printing the revision to each node's",
    "`fleet revision applied` log line (both clocks are this machine's).",
    "",
])
out = root / "bench" / "results" / f"fleet-{now:%Y-%m-%d-%H%M}-{commit}.md"
out.write_text(report)
print(report)
print(f"written to {out}")
