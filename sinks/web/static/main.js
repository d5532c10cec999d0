// The dashboard: one page, three views (the fleet at /, an agent at /agents/ID, a task at /tasks/ID), all
// fed by one live connection. The server is the source of truth; this only keeps what it was sent.

import { connect } from "./live.js";
import { Fleet } from "./fleet.js";
import { Timeline } from "./timeline.js";
import { EventLog } from "./events.js";
import { showAgent } from "./agent.js";
import { showTask } from "./task.js";
import { el } from "./format.js";

const STATES = ["stalled", "suspect", "recovered", "alive", "left"];

// What the live stream sent: agent rows by index, as objects.
class Store {
  constructor() {
    this.names = [];
    this.rows = new Map();
    this.fields = [];
    this.orphaned = [];
    this.skew = 0;  // server clock minus this clock
  }

  now() { return Date.now() + this.skew; }
  has(i) { return this.rows.has(i); }
  row(i) { return this.rows.get(i); }
  indexes() { return [...this.rows.keys()]; }
  size() { return this.rows.size; }
  byName(name) { const i = this.names.indexOf(name); return i < 0 ? undefined : this.rows.get(i); }

  load(snapshot) {
    this.names = snapshot.names;
    this.fields = snapshot.fields;
    this.rows = new Map();
    this.skew = snapshot.now - Date.now();
    this.apply({ rows: snapshot.rows, added: [], gone: [] });
  }

  apply(message) {
    for (const [i, name] of message.added) this.names[i] = name;
    for (const [i, ...values] of message.rows) {
      const row = { agent: this.names[i] };
      this.fields.forEach((f, k) => { row[f] = values[k]; });
      this.rows.set(i, row);
    }
    for (const i of message.gone) this.rows.delete(i);
  }

  counts() {
    const counts = Object.fromEntries(STATES.map((s) => [s, []]));
    for (const row of this.rows.values()) counts[row.state]?.push(row.agent);
    return counts;
  }
}

const store = new Store();
const fleet = new Fleet(store);
const timeline = new Timeline(document.getElementById("timeline"));
const events = new EventLog(document.getElementById("events"));
let current = null;  // the agent or task view shown, with its `update()`

function renderCounts() {
  const nav = document.getElementById("counts");
  const counts = store.counts();
  const buttons = STATES.map((state) => {
    const names = counts[state];
    const button = el("button", {
      type: "button", class: `count s-${state}`, title: names.slice(0, 40).join("\n") + (names.length > 40 ? "\n…" : ""),
    }, el("b", { text: String(names.length) }), ` ${state}`);
    button.addEventListener("click", () => {
      document.getElementById("state-filter").value = state;
      fleet.filter(state, fleet.text);
      navigate("/");
    });
    return button;
  });
  const orphans = el("button", {
    type: "button", class: "count", title: store.orphaned.slice(0, 40).join("\n"),
  }, el("b", { text: String(store.orphaned.length) }), " orphaned tasks");
  orphans.addEventListener("click", () => showOrphans(orphans));
  nav.replaceChildren(...buttons, orphans);
}

function showOrphans(anchor) {
  document.querySelector(".popover")?.remove();
  const list = el("ul", {}, ...store.orphaned.map((t) => el("li", {}, el("a", { href: `/tasks/${encodeURIComponent(t)}`, "data-route": "", text: t }))));
  const box = el("div", { class: "popover", role: "dialog", "aria-label": "Orphaned tasks" },
    store.orphaned.length ? list : "no orphaned task");
  const rect = anchor.getBoundingClientRect();
  box.style.left = `${rect.left + window.scrollX}px`;
  box.style.top = `${rect.bottom + window.scrollY + 4}px`;
  document.body.append(box);
  setTimeout(() => document.addEventListener("click", () => box.remove(), { once: true }), 0);
}

function renderHealth(h) {
  if (!h || !h.at_ms) return;
  const bad = (ok) => (ok ? "" : "bad");
  const am = h.alertmanager || { members: 0, up: 0 };
  const parts = [
    el("span", { class: bad(h.ingest_up), text: `ingest ${h.ingest_up ? (h.ingest_rate ?? "…") + " hb/s" : "down"}` }),
    el("span", { class: bad(h.lag_s !== null && h.lag_s < 2), text: `end-to-end lag ${h.lag_s ?? "?"} s` }),
    el("span", { class: bad(h.bridge_up && (h.bridge_watermark_age_s ?? 0) < 2), text: `bridge watermark ${h.bridge_up ? (h.bridge_watermark_age_s ?? 0).toFixed(1) + " s old" : "down"}` }),
    el("span", { class: bad(h.workers_up === h.workers), text: `workers up ${h.workers_up}/${h.workers}` }),
    el("span", { class: bad(am.members === 0 || am.up === am.members), text: am.members ? `Alertmanager ${am.up}/${am.members} reachable` : "alerts off" }),
  ];
  // the latest `hbreg tune` report, its own page (not routed in here)
  if (h.tune_report) parts.push(el("a", { href: "/reports/tune", text: "tuning report" }));
  document.getElementById("health").replaceChildren(...parts);
}

function everything() {
  renderCounts();
  fleet.refresh();
  current?.update();
}

connect({
  snapshot(m) {
    store.load(m);
    store.orphaned = m.orphaned || [];
    events.load(m.events);
    timeline.load(m.timeline, m.events);
    renderHealth(m.health);
    everything();
  },
  agents(m) {
    store.apply(m);
    everything();
  },
  events(m) {
    events.add(m.items);
    timeline.events(m.items);
    current?.update(m.items);
  },
  health(m) {
    store.orphaned = m.orphaned || [];
    renderHealth(m.health);
    renderCounts();
  },
  timeline(m) { timeline.add(m.point); },
});

// --- routing: links with data-route change the view without a reload -------------------------------

function route() {
  const path = decodeURIComponent(location.pathname);
  const views = { fleet: document.getElementById("fleet-view"), agent: document.getElementById("agent-view"),
    task: document.getElementById("task-view") };
  current?.close?.();
  current = null;
  let shown = "fleet";
  if (path.startsWith("/agents/")) {
    shown = "agent";
    current = showAgent(views.agent, path.slice(8), store);
  } else if (path.startsWith("/tasks/")) {
    shown = "task";
    current = showTask(views.task, path.slice(7));
  }
  for (const [name, view] of Object.entries(views)) view.hidden = name !== shown;
  if (shown === "fleet") fleet.refresh(true);
}

function navigate(href) {
  if (location.pathname !== href) history.pushState({}, "", href);
  route();
}

document.addEventListener("click", (e) => {
  const a = e.target.closest("a[data-route]");
  if (!a || e.ctrlKey || e.metaKey || e.shiftKey || e.button !== 0) return;
  e.preventDefault();
  navigate(a.getAttribute("href"));
});
window.addEventListener("popstate", route);
route();
