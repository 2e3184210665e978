// The Spillway console: one read-only page over the admin API. The admin key comes from the
// address's fragment (#key=..., never sent to the server) or the form, and stays in this tab's
// sessionStorage. Every value is written with textContent (no markup from data).
"use strict";

const DATA = "/v1/spillway/admin/console/data";
const REFRESH_MS = 5000;

function key() {
  const match = /(?:^|&)key=([^&]+)/.exec(location.hash.slice(1));
  if (match) {
    sessionStorage.setItem("spillway-admin-key", decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname);
  }
  return sessionStorage.getItem("spillway-admin-key");
}

function cell(row, value, attrs) {
  const td = row.insertCell();
  td.textContent = value === null || value === undefined ? "–" : String(value);
  if (typeof value === "number") td.className = "num";
  for (const [name, v] of Object.entries(attrs || {})) td.dataset[name] = v;
  return td;
}

function fill(id, rows, columns) {
  const body = document.querySelector(`#${id} tbody`);
  body.replaceChildren();
  for (const item of rows) {
    const row = body.insertRow();
    for (const [value, attrs] of columns(item)) cell(row, value, attrs);
  }
}

function money(x) { return Math.round(x * 1e6) / 1e6; }

function chart(rows) {
  const svg = document.getElementById("chart");
  svg.replaceChildren();
  const max = Math.max(1e-12, ...rows.map(r => r.cost));
  const ns = "http://www.w3.org/2000/svg";
  svg.setAttribute("height", String(16 + rows.length * 34));
  rows.forEach((r, i) => {
    const width = Math.max(1, Math.round(300 * r.cost / max));
    const bar = document.createElementNS(ns, "rect");
    Object.entries({x: 110, y: 10 + i * 34, width, height: 24, fill: r.site === "onprem" ? "#2e90fa" : "#f79009"})
      .forEach(([k, v]) => bar.setAttribute(k, v));
    bar.dataset.site = r.site;
    bar.dataset.cost = money(r.cost);
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", 4); label.setAttribute("y", 27 + i * 34);
    label.textContent = r.site;
    const value = document.createElementNS(ns, "text");
    value.setAttribute("x", 116 + width); value.setAttribute("y", 27 + i * 34);
    value.textContent = money(r.cost).toString();
    svg.append(bar, label, value);
  });
}

function render(d) {
  document.getElementById("router").textContent = d.router_replica;
  document.getElementById("period").textContent = `${d.usage.from} .. ${d.usage.to}`;
  const engines = [];
  for (const [model, sites] of Object.entries(d.health.models || {}))
    for (const [site, s] of Object.entries(sites)) engines.push({model, site, ...s});
  fill("engines", engines, e => [[e.model], [e.site], [e.healthy ? "yes" : "no"], [e.replica],
    [e.running, {engine: `${e.model}|${e.site}`, field: "running"}], [e.waiting], [e.in_flight],
    [e.max_num_seqs], [e.kv_cache_usage], [e.itl_ms]]);
  fill("models", Object.entries(d.scheduler.models), ([model, m]) => [[model],
    [m.queued, {model, field: "queued"}], [m.spill_gate_open ? "open" : "closed", {model, field: "gate"}],
    [Object.values(m.spilled).reduce((a, b) => a + b, 0)], [m.budget_misses], [m.predicted_preferred_wait_ms]]);
  fill("budgets", d.budgets, b => [[b.scope], [b.period], [b.limit],
    [money(b.spent), {budget: `${b.scope}|${b.period}`, field: "spent"}], [money(b.reserved)],
    [`${b.used_pct} %`, {budget: `${b.scope}|${b.period}`, field: "used_pct"}], [b.policy]]);
  const sites = d.usage.data.map(r => ({site: r.site, requests: r.requests,
    tokens: r.prompt_tokens + r.completion_tokens, cost: r.cost}));
  fill("sites", sites, s => [[s.site], [s.requests, {site: s.site, field: "requests"}], [s.tokens],
    [money(s.cost), {site: s.site, field: "cost"}]]);
  chart(sites);
  fill("audit", d.audit.slice().reverse(), r => [[r.seq, {seq: r.seq}],
    [new Date(r.at * 1000).toISOString().slice(11, 19)], [r.request_id], [r.tenant], [r.variant || r.model],
    [r.data_class], [r.site], [r.status], [(r.prompt_tokens || 0) + (r.completion_tokens || 0)], [money(r.cost || 0)]]);
}

async function load() {
  const status = document.getElementById("status");
  const answer = await fetch(DATA, {headers: {authorization: `Bearer ${key()}`}, cache: "no-store"});
  if (answer.status === 401) {
    sessionStorage.removeItem("spillway-admin-key");
    document.getElementById("main").hidden = true;
    document.getElementById("login").hidden = false;
    status.textContent = "admin key needed";
    return false;
  }
  const data = await answer.json();
  render(data);
  document.getElementById("main").hidden = false;
  status.textContent = data.health.status === "ok" ? "healthy" : data.health.status;
  status.className = data.health.status === "ok" ? "ok" : "bad";
  document.getElementById("refreshed").textContent = `updated ${new Date().toISOString().slice(11, 19)} UTC`;
  document.body.dataset.loaded = "1";
  return true;
}

document.getElementById("login").addEventListener("submit", event => {
  event.preventDefault();
  sessionStorage.setItem("spillway-admin-key", document.getElementById("key").value);
  load();
});

if (key()) {
  load().then(ok => ok && setInterval(load, REFRESH_MS));
} else {
  document.getElementById("login").hidden = false;
  document.getElementById("status").textContent = "admin key needed";
}
