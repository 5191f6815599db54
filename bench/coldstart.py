"""Cold start with and without the compiled-code cache: `weir route` and
`weir run` (until its listener is announced) over a config with mesh-router,
the largest Rust plugin. Writes a report under bench/results/.

    bench/run.sh coldstart
"""
import datetime, subprocess, time, sys, os, statistics, tempfile, pathlib, shutil

root = pathlib.Path(__file__).resolve().parent.parent
weir = str(root / "target" / "release" / "weir")
work = pathlib.Path(tempfile.mkdtemp())
os.chmod(work, 0o700)
mesh = root / "target" / "wasm32-wasip2" / "release" / "mesh_router.wasm"
cfg = work / "weir.toml"
cfg.write_text(f'''
[listeners.public]
bind = "127.0.0.1:0"
plugins = ["mesh"]

[plugins.mesh]
wasm = "{mesh}"
config_file = "{root / 'examples' / 'mesh' / 'dynamic.yml'}"

[cache]
dir = "{work / 'cache'}"
''')
def route(extra):
    t = time.perf_counter()
    subprocess.run([weir, "route", "--config", str(cfg), "--listener", "public", "--sni", "app.mesh.localhost", *extra], check=True, capture_output=True)
    return (time.perf_counter() - t) * 1000
def run(extra):
    t = time.perf_counter()
    p = subprocess.Popen([weir, "run", "--config", str(cfg), *extra], stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        if "listening" in line:
            ms = (time.perf_counter() - t) * 1000
            break
    p.terminate(); p.wait()
    return ms
n = 7
cold = [route(["--no-cache"]) for _ in range(n)]
route([])  # fills the cache
warm = [route([]) for _ in range(n)]
run_cold = [run(["--no-cache"]) for _ in range(3)]
run_warm = [run([]) for _ in range(n)]
med = statistics.median
size = sum(f.stat().st_size for f in (work / "cache").iterdir())
shutil.rmtree(work)
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True).stdout.strip()
commit += "+changes" if dirty else ""
now = datetime.datetime.now(datetime.timezone.utc)
rows = [
    ("`weir route`, no cache (`--no-cache`)", cold),
    ("`weir route`, warm cache", warm),
    ("`weir run` until listening, no cache", run_cold),
    ("`weir run` until listening, warm cache", run_warm),
]
lines = [
    f"# Cold start with the compiled-code cache — {now:%Y-%m-%d %H:%M} UTC",
    "",
    f"Produced by `bench/run.sh coldstart` at commit `{commit}`: the release build, a config with",
    "mesh-router reading examples/mesh/dynamic.yml (Traefik's routers), wall time from spawning the process to its exit (`route`) or to its",
    f"`listening` log line (`run`). The cache holds one entry of {size / 1e6:.1f} MB.",
    "",
    "| what | median (ms) | min | max | runs |",
    "| --- | --- | --- | --- | --- |",
]
for what, samples in rows:
    lines.append(f"| {what} | {med(samples):.0f} | {min(samples):.0f} | {max(samples):.0f} | {len(samples)} |")
report = "\n".join(lines) + "\n"
print(report)
out = root / "bench" / "results" / f"coldstart-{now:%Y-%m-%d-%H%M}-{commit}.md"
out.write_text(report)
print(f"written to {out.relative_to(root)}")
