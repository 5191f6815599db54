#!/usr/bin/env python3
"""Memory after failed reloads of a large plugin.

weir starts on a small config (static-router), then is asked five times to
reload a config that adds the 18 MB Python example plugin with a config its
`configure` refuses: each attempt compiles the component (cranelift
allocates hundreds of MiB doing so), fails, and keeps the running config.
weir's RSS is read after each attempt and 2 s after the last. The promise:
after the third attempt RSS grows by at most GROWTH_BOUND_MIB over the rest
(a failed build frees what it allocated; the allocator keeps only what it
reuses).

Started by `bench/run.sh reload-memory`.
"""

import datetime
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import run as bench

ADMIN = "127.0.0.1:10451"
CONFIG = bench.WORK / "reload-memory.toml"
PYTHON_PLUGIN = bench.ROOT / "target" / "wasm32-wasip2" / "release" / "alpn_router_py.wasm"
ATTEMPTS = 5
GROWTH_BOUND_MIB = 32
# Without the compiled-code cache every attempt compiles the component anew
# (with it, attempts after the first load it from disk).
NO_CACHE = "--no-cache" in sys.argv
CACHE_OFF = "[cache]\nenabled = false\n"
# Another weir binary to measure the same way (an earlier commit's build).
if "--weir" in sys.argv:
    bench.WEIR = bench.Path(sys.argv[sys.argv.index("--weir") + 1])


def write(with_python):
    python = f"""
[plugins.alpn]
wasm = "{PYTHON_PLUGIN}"
configure_timeout = "30s"
config = {{ protocols = {{}}, default = "web" }}
""" if with_python else ""
    chain = '["alpn", "router"]' if with_python else '["router"]'
    CONFIG.write_text(f"""
[listeners.public]
bind = "127.0.0.1:10444"
plugins = {chain}

[plugins.router]
wasm = "{bench.PLUGIN}"
config.default = {{ pool = "web" }}
{python}
[pools.web]
servers = ["127.0.0.1:1"]

[admin]
bind = "{ADMIN}"

[reload]
watch = false
{CACHE_OFF if NO_CACHE else ""}
""")


def rss_mib(pid):
    return bench.rss_kib(pid) / 1024


def main():
    if not PYTHON_PLUGIN.exists():
        sys.exit(f"{PYTHON_PLUGIN} is missing: scripts/build-plugins.sh builds it (python3 with venv needed)")
    bench.WORK.mkdir(parents=True, exist_ok=True)
    write(False)
    weir = bench.start_weir(CONFIG, "reload-memory")
    try:
        bench.wait_for_port(int(ADMIN.rsplit(":", 1)[1]), weir)
        rows = [("start", 0.0, rss_mib(weir.pid))]
        write(True)
        for attempt in range(1, ATTEMPTS + 1):
            started = time.time()
            request = urllib.request.Request(f"http://{ADMIN}/api/reload", method="POST")
            try:
                urllib.request.urlopen(request, timeout=300)
                sys.exit("the reload was meant to fail, and succeeded")
            except urllib.error.HTTPError as e:
                if e.code != 422:
                    raise
            rows.append((f"failed reload {attempt}", time.time() - started, rss_mib(weir.pid)))
        time.sleep(2)
        rows.append(("2 s later", 0.0, rss_mib(weir.pid)))
    finally:
        bench.stop(weir)
    growth = rows[-1][2] - rows[3][2]
    met = growth <= GROWTH_BOUND_MIB
    commit = bench.commit()
    if "--weir" in sys.argv:
        commit += f"-with-{os.path.basename(bench.WEIR)}"
    if NO_CACHE:
        commit += "-no-cache"
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [
        f"# Memory after failed reloads, {now:%Y-%m-%d %H:%M} UTC, commit {commit}",
        "",
        f"`bench/run.sh reload-memory`: weir (release build) on static-router, then {ATTEMPTS} reloads that add the "
        f"{PYTHON_PLUGIN.stat().st_size / 1e6:.1f} MB Python example plugin with a config its `configure` refuses "
        "(each compiles the component, then fails)"
        + (", the compiled-code cache off (`--no-cache`: every attempt compiles anew)." if NO_CACHE else "."),
        "",
        "| step | seconds | weir RSS MiB |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {step} | {seconds:.1f} | {rss:.1f} |" for step, seconds, rss in rows]
    lines += ["", f"Growth after the third attempt: {growth:+.1f} MiB (bound {GROWTH_BOUND_MIB}): {'met' if met else 'NOT met'}."]
    text = "\n".join(lines) + "\n"
    bench.RESULTS.mkdir(parents=True, exist_ok=True)
    path = bench.RESULTS / f"reload-memory-{now:%Y-%m-%d-%H%M}-{commit}.md"
    path.write_text(text)
    print(text)
    print(f"report: {path}")
    sys.exit(0 if met else 1)


if __name__ == "__main__":
    main()
