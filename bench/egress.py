"""The egress hop's cost: pgbench connecting and running `SELECT 1` against
PostgreSQL 15 through weir's RA-TLS sidecar, once with libpq speaking TLS
(and presenting the RA-TLS client certificate) to the sidecar itself, once
through a weir egress on loopback that does it for a plain libpq
(`sslmode=disable`), both ways PostgreSQL starts TLS. PostgreSQL directly,
without TLS, is the floor. Writes a report under bench/results/.

    bench/run.sh egress [--seconds N]
"""
import datetime, os, pathlib, re, socket, subprocess, sys, tempfile, time

root = pathlib.Path(__file__).resolve().parent.parent
release = root / "target" / "release"
wasm = root / "target" / "wasm32-wasip2" / "release"
seconds = int(sys.argv[sys.argv.index("--seconds") + 1]) if "--seconds" in sys.argv else 10
egress_mrtd, sidecar_mrtd = "e9" * 48, "5c" * 48


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port):
    for _ in range(200):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


work = pathlib.Path(tempfile.mkdtemp())
os.chmod(work, 0o755)
procs = []
as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
try:
    certs = work / "certs"
    demo = subprocess.Popen([release / "demo-upstream", "--dir", certs, "--plain", f"keep=127.0.0.1:{free_port()}",
                             "--ratls", f"egress=app,{egress_mrtd}", "--ratls", f"sidecar=db,{sidecar_mrtd}"],
                            stdout=subprocess.DEVNULL)
    procs.append(demo)
    while not (certs / "ca.pem").exists():
        time.sleep(0.05)
    initdb = sorted(pathlib.Path("/usr/lib/postgresql").glob("*/bin/initdb"))[-1]
    pg_dir = work / "pg"
    pg_dir.mkdir()
    if as_pg:
        subprocess.run(["chown", "postgres", pg_dir], check=True)
    subprocess.run([*as_pg, initdb, "-D", pg_dir / "data", "-U", "postgres", "--auth=trust", "--no-sync"],
                   check=True, stdout=subprocess.DEVNULL)
    pg, sidecar, egress_direct, egress_ssl = (free_port() for _ in range(4))
    procs.append(subprocess.Popen([*as_pg, initdb.parent / "postgres", "-D", pg_dir / "data", "-p", str(pg),
                                   "-k", pg_dir, "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                                   "-c", "max_connections=200"], stderr=subprocess.DEVNULL))
    wait_port(pg)
    configs = {
        "sidecar": f'''
[listeners.db]
bind = "127.0.0.1:{sidecar}"
protocol = "postgres"
plugins = ["route", "allow"]
[plugins.route]
wasm = "{wasm / 'static_router.wasm'}"
config.default = {{ address = "127.0.0.1:{pg}", terminate = {{ certificate = "sidecar", client_auth = "attested" }} }}
config.no_sni = {{ address = "127.0.0.1:{pg}", terminate = {{ certificate = "sidecar", client_auth = "attested" }} }}
[plugins.allow]
wasm = "{wasm / 'attestation_allowlist.wasm'}"
config = {{ require_verified = false, rules = [{{ side = "client", mrtd = ["{egress_mrtd}"] }}] }}
[certificates.sidecar]
cert = "{certs / 'sidecar.pem'}"
key = "{certs / 'sidecar-key.pem'}"
''',
        "egress": f'''
[listeners.direct]
bind = "127.0.0.1:{egress_direct}"
protocol = "postgres"
plugins = ["egress", "allow"]
[listeners.sslrequest]
bind = "127.0.0.1:{egress_ssl}"
protocol = "postgres"
plugins = ["egress", "allow"]
[plugins.egress]
wasm = "{wasm / 'egress.wasm'}"
config.routes.direct = {{ remote = "127.0.0.1:{sidecar}", server_name = "db", protocol = "postgres", client_cert = "app" }}
config.routes.sslrequest = {{ remote = "127.0.0.1:{sidecar}", server_name = "db", protocol = "postgres-sslrequest", client_cert = "app" }}
[plugins.allow]
wasm = "{wasm / 'attestation_allowlist.wasm'}"
config = {{ require_verified = false, rules = [{{ side = "upstream", mrtd = ["{sidecar_mrtd}"] }}] }}
[certificates.app]
cert = "{certs / 'egress.pem'}"
key = "{certs / 'egress-key.pem'}"
''',
    }
    for name, text in configs.items():
        path = work / f"{name}.toml"
        path.write_text(text)
        procs.append(subprocess.Popen([release / "weir", "run", "--config", path],
                                      stderr=subprocess.DEVNULL, env={**os.environ, "RUST_LOG": "warn"}))
    for port in (sidecar, egress_direct, egress_ssl):
        wait_port(port)
    script = work / "select1.sql"
    script.write_text("SELECT 1;\n")
    os.chmod(certs / "egress-key.pem", 0o600)
    base = "user=postgres dbname=postgres host=127.0.0.1"
    tls_to_sidecar = f"sslmode=require sslcert={certs / 'egress.pem'} sslkey={certs / 'egress-key.pem'}"
    cases = [
        ("PostgreSQL directly, no TLS (the floor)", f"{base} port={pg} sslmode=disable"),
        ("libpq TLS to the sidecar (SSLRequest, RA-TLS client certificate)", f"{base} port={sidecar} {tls_to_sidecar}"),
        ("plain libpq → weir egress → sidecar, SSLRequest", f"{base} port={egress_ssl} sslmode=disable"),
        ("plain libpq → weir egress → sidecar, direct TLS (ALPN postgresql)", f"{base} port={egress_direct} sslmode=disable"),
    ]

    def pgbench(conninfo, connect_each):
        args = ["pgbench", "-n", "-f", script, "-T", str(seconds), "-c", "1", "-j", "1"]
        done = subprocess.run([*args, *(["-C"] if connect_each else []), conninfo], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"pgbench on `{conninfo}` failed: {done.stderr.strip()}")
        out = done.stdout
        latency = float(re.search(r"latency average = ([0-9.]+) ms", out).group(1))
        connect = re.search(r"average connection time = ([0-9.]+) ms", out)
        return latency, float(connect.group(1)) if connect else None

    rows = []
    for what, conninfo in cases:
        per_connection, connect = pgbench(conninfo, True)
        select1, _ = pgbench(conninfo, False)
        rows.append((what, connect, per_connection, select1))
finally:
    for p in reversed(procs):
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
    subprocess.run(["rm", "-rf", work])

commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True).stdout.strip()
commit += "+changes" if dirty else ""
now = datetime.datetime.now(datetime.timezone.utc)
lines = [
    f"# The egress hop — {now:%Y-%m-%d %H:%M} UTC",
    "",
    f"Produced by `bench/run.sh egress` at commit `{commit}`: release build, PostgreSQL 15 on loopback",
    "behind weir's RA-TLS sidecar (simulated certificates; client-auth attested, attestation-allowlist on",
    f"both sides), pgbench with one client for {seconds} s per figure: `-C` (a new connection for each",
    "`SELECT 1`: pgbench's average connection time, and the whole transaction) and one kept connection",
    "(the `SELECT 1` round trip). Every process shares the machine's cores; nothing is pinned.",
    "",
    "| path | connect (ms) | connect + SELECT 1 (ms) | SELECT 1 on an open connection (ms) |",
    "| --- | --- | --- | --- |",
]
for what, connect, per_connection, select1 in rows:
    lines.append(f"| {what} | {connect:.3f} | {per_connection:.3f} | {select1:.3f} |")
floor, libpq, egress = rows[0], rows[1], rows[2]
lines += ["", f"A new connection and `SELECT 1` through the egress (SSLRequest both ways): {egress[2]:.3f} ms, against",
          f"{libpq[2]:.3f} ms with libpq's own TLS to the sidecar ({egress[2] - libpq[2]:+.3f} ms) and {floor[2]:.3f} ms for",
          f"PostgreSQL without TLS ({egress[2] - floor[2]:+.3f} ms); on an open connection, {egress[3]:.3f} ms against",
          f"{libpq[3]:.3f} ms ({egress[3] - libpq[3]:+.3f} ms) and {floor[3]:.3f} ms."]
report = "\n".join(lines) + "\n"
print(report)
out = root / "bench" / "results" / f"egress-{now:%Y-%m-%d-%H%M}-{commit}.md"
out.write_text(report)
print(f"written to {out.relative_to(root)}")
