// weir's dashboard: reads the admin API every two seconds and shows it.
// Every name shown comes from configs and clients, so text is only ever
// set with textContent, never parsed as HTML. The admin token, when the
// server wants one, is kept in this tab's sessionStorage and sent as a
// bearer token; actions are POST or DELETE requests of the admin API.
"use strict";

const REFRESH_MS = 2000;
const TOKEN_KEY = "weir-admin-token";
const SERVED = new Set(["closed", "idle-timeout", "half-close-timeout", "acme-challenge"]);
let previous = null;
// An action's error stays up this long, across refreshes.
const STICKY_MS = 10000;
let stickyUntil = 0;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else if (key === "onclick") node.addEventListener("click", value);
    else node[key] = value;
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(child === undefined || child === null ? "" : String(child)));
  }
  return node;
}

function fill(tbody, rows) {
  if (!rows.length) {
    const columns = tbody.closest("table").querySelectorAll("thead th").length || 1;
    rows = [el("tr", { class: "empty" }, el("td", { colSpan: columns }, "none"))];
  }
  tbody.replaceChildren(...rows);
}

function banner(text, sticky) {
  const node = document.getElementById("banner");
  node.textContent = text;
  node.hidden = !text;
  if (sticky) stickyUntil = Date.now() + STICKY_MS;
}

class Unauthorized extends Error {}

async function api(path, options) {
  const headers = Object.assign({}, (options && options.headers) || {});
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers["Authorization"] = "Bearer " + token;
  const response = await fetch(path, Object.assign({}, options, { headers, cache: "no-store" }));
  if (response.status === 401) {
    document.getElementById("token-form").hidden = false;
    throw new Unauthorized(token ? "The token was refused (401): nothing was read or changed." : "This admin server needs its token.");
  }
  return response;
}

async function json(path) {
  const response = await api(path);
  if (response.status === 404) return null;
  if (!response.ok) throw new Error(path + ": " + response.status);
  return response.json();
}

// The Prometheus text format: `name{label="value",...} number`.
function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)/.exec(line);
    if (!match) continue;
    const labels = {};
    const body = match[3] || "";
    const label = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
    let found;
    while ((found = label.exec(body)) !== null) {
      labels[found[1]] = found[2].replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
    }
    samples.push({ name: match[1], labels, value: Number(match[4]) });
  }
  return samples;
}

function sum(samples, name, filter) {
  return samples.filter((s) => s.name === name && (!filter || filter(s.labels))).reduce((t, s) => t + s.value, 0);
}

function rate(now, before, seconds) {
  if (before === undefined || seconds <= 0) return "–";
  return ((now - before) / seconds).toFixed(1);
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}

function when(seconds) {
  if (!seconds) return "–";
  return new Date(seconds * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
}

// A quantile from a cumulative histogram: the upper bound of its bucket.
function quantile(buckets, q) {
  const total = buckets.length ? buckets[buckets.length - 1].count : 0;
  if (!total) return "–";
  const bucket = buckets.find((b) => b.count >= q * total);
  if (!bucket || bucket.le === Infinity) return "> " + seconds(buckets[buckets.length - 2].le);
  return "≤ " + seconds(bucket.le);
}

function seconds(s) {
  return s < 1e-3 ? (s * 1e6).toFixed(0) + " µs" : s < 1 ? (s * 1e3).toFixed(1) + " ms" : s.toFixed(2) + " s";
}

function renderOverview(data, metrics, elapsed) {
  const o = data.overview;
  const totals = {
    connections: sum(metrics, "weir_connections_total"),
    up: sum(metrics, "weir_bytes_total", (l) => l.direction === "up"),
    down: sum(metrics, "weir_bytes_total", (l) => l.direction === "down"),
  };
  const before = previous ? previous.totals : {};
  const reload = o.reload && o.reload.last;
  const facts = [
    ["Version", o.version],
    ["Up since", when(o.started_at) + " (" + Math.round(o.uptime_seconds / 60) + " min)"],
    ["Config", o.fleet_revision ? "etcd revision " + o.fleet_revision : "sha256 " + o.config_sha256.slice(0, 16) + "…"],
    ["Active connections", o.active_connections],
    ["New connections / s", rate(totals.connections, before.connections, elapsed)],
    ["Bytes / s up, down", rate(totals.up, before.up, elapsed) + ", " + rate(totals.down, before.down, elapsed)],
    ["Last reload", reload ? when(reload.at) + ", " + reload.trigger + ", " + (reload.error ? "failed: " + reload.error : "ok") : "none"],
  ];
  document.getElementById("overview-list").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  const causes = {};
  for (const s of metrics) {
    if (s.name === "weir_connections_total" && !SERVED.has(s.labels.outcome)) causes[s.labels.outcome] = (causes[s.labels.outcome] || 0) + s.value;
    if (s.name === "weir_shed_total") causes["limit: " + s.labels.limit] = (causes["limit: " + s.labels.limit] || 0) + s.value;
  }
  const beforeCauses = previous ? previous.causes : {};
  fill(document.querySelector("#refusals tbody"), Object.entries(causes).map(([cause, total]) =>
    el("tr", { "data-cause": cause }, el("td", {}, cause), el("td", {}, rate(total, beforeCauses[cause], elapsed)), el("td", {}, total))));
  return { totals, causes };
}

function renderRoutes(data, metrics) {
  const listeners = data.routes.listeners;
  const counts = data.connections.listeners;
  fill(document.querySelector("#listeners tbody"), Object.entries(listeners).map(([name, l]) =>
    el("tr", { "data-listener": name }, el("td", {}, name), el("td", {}, l.bind), el("td", {}, l.protocol),
      el("td", {}, l.plugins.join(" → ")), el("td", {}, (counts[name] || {}).active), el("td", {}, (counts[name] || {}).total))));
  const routes = new Map();
  const routeOf = (s) => {
    const key = [s.labels.listener, s.labels.tenant, s.labels.route].join("\u0000");
    if (!routes.has(key)) routes.set(key, { labels: s.labels, active: 0, total: 0, outcomes: {} });
    return routes.get(key);
  };
  for (const s of metrics) {
    if (s.name === "weir_route_connections_active") routeOf(s).active += s.value;
    if (s.name !== "weir_connections_total") continue;
    const route = routeOf(s);
    route.total += s.value;
    route.outcomes[s.labels.outcome] = (route.outcomes[s.labels.outcome] || 0) + s.value;
  }
  const traffic = new Map();
  for (const s of metrics) {
    if (s.name !== "weir_route_bytes_total") continue;
    const key = [s.labels.listener, s.labels.tenant, s.labels.route].join("\u0000");
    const t = traffic.get(key) || { up: 0, down: 0 };
    t[s.labels.direction === "up" ? "up" : "down"] += s.value;
    traffic.set(key, t);
  }
  fill(document.querySelector("#route-table tbody"), [...routes.entries()].map(([key, r]) => {
    const t = traffic.get(key) || { up: 0, down: 0 };
    return el("tr", { "data-route": r.labels.route }, el("td", {}, r.labels.listener), el("td", {}, r.labels.tenant), el("td", { class: "route" }, r.labels.route),
      el("td", { class: "active" }, r.active), el("td", { class: "total" }, r.total), el("td", { class: "bytes" }, bytes(t.up) + " / " + bytes(t.down)),
      el("td", {}, Object.entries(r.outcomes).map(([o, n]) => o + " " + n).join(", ")));
  }));
  const select = document.getElementById("route-listener");
  if (select.options.length !== Object.keys(listeners).length) {
    select.replaceChildren(...Object.keys(listeners).map((name) => el("option", { value: name }, name)));
  }
}

function renderPlugins(data, metrics) {
  fill(document.querySelector("#plugin-table tbody"), data.plugins.plugins.map((p) => {
    const buckets = metrics.filter((s) => s.name === "weir_plugin_call_seconds_bucket" && s.labels.plugin === p.name)
      .map((s) => ({ le: s.labels.le === "+Inf" ? Infinity : Number(s.labels.le), count: s.value })).sort((a, b) => a.le - b.le);
    const calls = sum(metrics, "weir_plugin_call_seconds_count", (l) => l.plugin === p.name);
    const failures = metrics.filter((s) => s.name === "weir_plugin_failures_total" && s.labels.plugin === p.name && s.value > 0)
      .map((s) => s.labels.kind + " " + s.value).join(", ");
    return el("tr", { "data-plugin": p.name }, el("td", {}, p.name), el("td", { class: "hash", title: p.sha256 }, p.sha256.slice(0, 12) + "…"),
      el("td", {}, when(p.loaded_at)), el("td", {}, calls), el("td", {}, quantile(buckets, 0.5)), el("td", {}, quantile(buckets, 0.99)),
      el("td", {}, failures || "none"), el("td", {}, p.last_error ? when(p.last_error.at) + ": " + p.last_error.error : ""), el("td", {}, p.idle_instances));
  }));
}

async function act(method, path, question, sent) {
  if (!window.confirm(question)) return;
  try {
    const options = sent === undefined ? { method } : { method, headers: { "Content-Type": "application/json" }, body: JSON.stringify(sent) };
    const response = await api(path, options);
    const body = await response.json().catch(() => ({}));
    if (!response.ok) banner(method + " " + path + ": " + (body.error || response.status), true);
    else banner("");
  } catch (error) {
    banner(error.message, true);
  }
  refresh();
}

function serverState(b) {
  if (b.draining) return "draining";
  if (b.ejected) return "ejected";
  return b.healthy ? "up" : "down";
}

function renderPools(data) {
  const pools = Object.entries(data.pools.pools);
  document.getElementById("pool-list").replaceChildren(...pools.map(([name, pool]) => {
    const base = "/api/pools/" + encodeURIComponent(name) + "/backends/";
    const rows = pool.backends.map((b) => {
      const address = encodeURIComponent(b.address);
      const drain = b.draining
        ? el("button", { onclick: () => act("POST", base + address + "/undrain", "Undrain " + b.address + " in pool " + name + "?") }, "Undrain")
        : el("button", { onclick: () => act("POST", base + address + "/drain", "Drain " + b.address + " in pool " + name + "? It gets no new connections; its own run to their end.") }, "Drain");
      const remove = el("button", { class: "danger", onclick: () => act("DELETE", base + address, "Remove " + b.address + " from pool " + name + "?") }, "Remove");
      const state = serverState(b);
      return el("tr", { "data-server": b.address }, el("td", {}, b.address), el("td", { class: "state " + state }, state), el("td", { class: "since" }, when(b.since)), el("td", {}, b.weight),
        el("td", {}, b.active), el("td", {}, b.connections), el("td", {}, b.failures), el("td", {}, bytes(b.bytes_up) + " / " + bytes(b.bytes_down)),
        el("td", {}, drain, " ", remove));
    });
    return el("div", { class: "pool", "data-pool": name },
      el("h3", {}, name + " (" + pool.policy + ", " + pool.healthy + " of " + pool.backends.length + " up)"),
      el("table", {}, el("thead", {}, el("tr", {}, ...["Server", "State", "Since", "Weight", "Active", "Made", "Connect failures", "Bytes up / down", ""].map((h) => el("th", {}, h)))), el("tbody", {}, ...rows)));
  }));
  const select = document.getElementById("add-pool");
  const names = pools.map(([name]) => name);
  if ([...select.options].map((o) => o.value).join("\u0000") !== names.join("\u0000")) {
    select.replaceChildren(...names.map((name) => el("option", { value: name }, name)));
  }
  document.getElementById("add-server-form").hidden = names.length === 0;
}

function addServer(event) {
  event.preventDefault();
  const pool = document.getElementById("add-pool").value;
  const address = document.getElementById("add-address").value.trim();
  const weight = Number(document.getElementById("add-weight").value);
  act("POST", "/api/pools/" + encodeURIComponent(pool) + "/backends", "Add " + address + " (weight " + weight + ") to pool " + pool + "?", { address, weight });
}

function renderTenants(data, metrics) {
  fill(document.querySelector("#tenant-table tbody"), Object.entries(data.tenants.tenants).map(([name, t]) =>
    el("tr", { "data-tenant": name }, el("td", {}, name), el("td", {}, t.domains.join(", ")),
      el("td", {}, t.active + " / " + (t.max_connections === null || t.max_connections === undefined ? "∞" : t.max_connections)),
      el("td", {}, sum(metrics, "weir_tenant_violations_total", (l) => l.tenant === name)),
      el("td", {}, sum(metrics, "weir_tenant_limited_total", (l) => l.tenant === name)))));
}

function renderCertificates(data) {
  const acme = data.certificates.acme || {};
  const now = Date.now() / 1000;
  const rows = data.certificates.certificates.map((c) => {
    const days = Math.floor((c.not_after - now) / 86400);
    const a = acme[c.name];
    return el("tr", { "data-certificate": c.name }, el("td", {}, c.name),
      el("td", { class: days < 30 ? "expiry soon" : "expiry" }, when(c.not_after) + " (" + days + " days)"),
      el("td", {}, c.ocsp_stapled ? "stapled, next update " + when(c.ocsp_next_update) : "none"),
      el("td", {}, a ? a.challenge + (a.last_order ? ", last order " + a.last_order.result + " by " + a.last_order.node + " " + when(a.last_order.at) : "") + (a.next_renewal ? ", renews " + when(a.next_renewal) : "") : "–"));
  });
  for (const name of data.certificates.awaiting_acme || []) {
    const a = acme[name] || {};
    rows.push(el("tr", { "data-certificate": name }, el("td", {}, name), el("td", { class: "expiry soon" }, "not issued yet"), el("td", {}, "–"),
      el("td", {}, (a.challenge || "") + (a.last_order ? ", last order " + a.last_order.result + (a.last_order.error ? ": " + a.last_order.error : "") : ""))));
  }
  fill(document.querySelector("#certificate-table tbody"), rows);
}

function renderFleet(fleet) {
  document.getElementById("fleet").hidden = !fleet;
  document.getElementById("fleet-link").hidden = !fleet;
  if (!fleet) return;
  const problem = document.getElementById("fleet-error");
  const cut = fleet.node && fleet.node.unreachable;
  problem.hidden = !fleet.error && !cut;
  problem.textContent = cut ? "This node cannot read etcd since " + when(cut[1]) + ": " + cut[0]
    : fleet.error ? "The node list could not be read from etcd: " + fleet.error : "";
  const current = (n) => n.current === undefined ? "" : n.current ? "current" : "behind (fleet at " + fleet.revision + ")";
  fill(document.querySelector("#fleet-table tbody"), Object.entries(fleet.nodes || {}).map(([name, n]) =>
    el("tr", { "data-node": name }, el("td", {}, name), el("td", {}, n.version), el("td", { class: "revision" }, n.revision),
      el("td", { class: "current" }, current(n)), el("td", {}, n.config_revision), el("td", { class: "serving" }, n.serving), el("td", {}, when(n.applied_at)),
      el("td", { class: "error" }, n.error ? n.error + (n.failed_revision ? " (revision " + n.failed_revision + ")" : "") : ""))));
}

async function refresh() {
  try {
    const [overview, routes, connections, plugins, pools, tenants, certificates, fleet, metricsText] = await Promise.all([
      json("/api/overview"), json("/api/routes"), json("/api/connections"), json("/api/plugins"), json("/api/pools"),
      json("/api/tenants"), json("/api/certificates"), json("/api/fleet"), api("/metrics").then((r) => r.text()),
    ]);
    document.getElementById("token-form").hidden = true;
    const metrics = parseMetrics(metricsText);
    const data = { overview, routes, connections, plugins, pools, tenants, certificates };
    const at = Date.now();
    const elapsed = previous ? (at - previous.at) / 1000 : 0;
    const kept = renderOverview(data, metrics, elapsed);
    renderRoutes(data, metrics);
    renderPlugins(data, metrics);
    renderPools(data);
    renderTenants(data, metrics);
    renderCertificates(data);
    renderFleet(fleet);
    previous = Object.assign({ at }, kept);
    document.getElementById("updated").textContent = "updated " + new Date(at).toLocaleTimeString();
    if (Date.now() > stickyUntil) banner("");
  } catch (error) {
    if (Date.now() > stickyUntil) banner(error.message);
  }
}

async function tryRoute(event) {
  event.preventDefault();
  const alpn = document.getElementById("route-alpn").value.split(",").map((s) => s.trim()).filter(Boolean);
  const sni = document.getElementById("route-sni").value.trim();
  const query = {
    listener: document.getElementById("route-listener").value,
    alpn,
    client_ip: document.getElementById("route-client").value.trim() || "127.0.0.1",
    protocol: document.getElementById("route-protocol").value,
  };
  if (sni) query.sni = sni;
  const decision = document.getElementById("route-decision");
  const explanation = document.getElementById("route-explanation");
  try {
    const response = await api("/api/route", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(query) });
    const body = await response.json();
    if (!response.ok) {
      decision.textContent = "Refused: " + body.error;
      explanation.textContent = "";
      return;
    }
    const action = Object.keys(body.decision.action || {})[0] || "decision";
    decision.textContent = action + ": route " + body.decision.route + (body.plugin ? ", by plugin " + body.plugin : ", no plugin decided");
    explanation.textContent = body.explanation;
  } catch (error) {
    decision.textContent = error.message;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, document.getElementById("token-input").value);
    document.getElementById("token-input").value = "";
    banner("");
    refresh();
  });
  document.getElementById("route-form").addEventListener("submit", tryRoute);
  document.getElementById("add-server-form").addEventListener("submit", addServer);
  refresh();
  setInterval(refresh, REFRESH_MS);
});
