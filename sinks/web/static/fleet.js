// The fleet table: problems first, sortable, filtered by state and text, `left` agents hidden by default.
// Only the rows in view exist in the DOM (virtual scrolling), so 10,000 agents cost what 30 do. While the
// pointer is on the table its order is held (values still update), so rows never jump under the cursor.

import uPlot from "./vendor/uplot/uPlot.esm.js";
import {
  Virtualizer, elementScroll, observeElementOffset, observeElementRect,
} from "./vendor/virtual-core/index.js";
import { ago, el, link } from "./format.js";

const ROW_HEIGHT = 30;
const RANK = { stalled: 0, suspect: 1, recovered: 2, alive: 3, left: 4 };
const PROBLEMS = new Set(["stalled", "suspect", "recovered"]);
const COLUMNS = [
  ["state", "State"], ["agent", "Agent"], ["task", "Task (epoch)"], ["status", "Status"], ["cpu", "CPU"],
  ["spark", "CPU trend"], ["seen", "Last seen"], ["phi", "phi"],
];
const SPARK_REFRESH_MS = 10_000;

export class Fleet {
  constructor(store) {
    this.store = store;
    this.scroll = document.getElementById("fleet-scroll");
    this.body = document.getElementById("fleet-body");
    this.countEl = document.getElementById("fleet-count");
    this.frozenEl = document.getElementById("frozen");
    this.stateFilter = "";
    this.text = "";
    this.sortKey = null;  // null: problems first
    this.sortDir = 1;
    this.order = [];
    this.hovering = false;
    this.pool = new Map();  // virtual item key -> row element
    this.sparks = new Map();  // agent -> {at, data}
    this.sparkWanted = new Set();
    this.sparkTimer = null;
    this.head();
    document.getElementById("state-filter").addEventListener("change", (e) => this.filter(e.target.value, this.text));
    document.getElementById("text-filter").addEventListener("input", (e) => this.filter(this.stateFilter, e.target.value));
    this.scroll.addEventListener("pointerenter", () => { this.hovering = true; });
    this.scroll.addEventListener("pointerleave", () => {
      this.hovering = false;
      this.frozenEl.hidden = true;
      this.refresh();
    });
    this.virtualizer = new Virtualizer({
      count: 0, getScrollElement: () => this.scroll, estimateSize: () => ROW_HEIGHT, overscan: 8,
      scrollToFn: elementScroll, observeElementRect, observeElementOffset, onChange: () => this.paint(),
    });
    this.virtualizer._didMount();
    this.virtualizer._willUpdate();
    setInterval(() => this.tick(), 1000);
  }

  head() {
    const head = document.getElementById("fleet-head");
    for (const [key, label] of COLUMNS) {
      const cell = el("div", { role: "columnheader" });
      if (key === "spark") cell.textContent = label;
      else {
        const button = el("button", { type: "button", text: label, "aria-label": `sort by ${label}` });
        button.addEventListener("click", () => this.sortBy(key));
        cell.append(button);
      }
      head.append(cell);
    }
  }

  filter(state, text) {
    this.stateFilter = state;
    this.text = text.trim().toLowerCase();
    this.refresh(true);
  }

  sortBy(key) {
    this.sortDir = this.sortKey === key ? -this.sortDir : 1;
    this.sortKey = key;
    this.refresh(true);
  }

  visible(row) {
    const state = row.state;
    if (this.stateFilter === "" && state === "left") return false;
    if (this.stateFilter === "problems" && !PROBLEMS.has(state)) return false;
    if (!["", "problems", "everything"].includes(this.stateFilter) && state !== this.stateFilter) return false;
    if (this.text && !row.agent.toLowerCase().includes(this.text) && !row.task_id.toLowerCase().includes(this.text)) return false;
    return true;
  }

  compare(a, b) {
    const ra = this.store.row(a), rb = this.store.row(b);
    if (this.sortKey === null) {
      return (RANK[ra.state] - RANK[rb.state]) || (rb.phi - ra.phi) || ra.agent.localeCompare(rb.agent);
    }
    const value = {
      state: (r) => RANK[r.state], agent: (r) => r.agent, task: (r) => r.task_id, status: (r) => r.status,
      cpu: (r) => r.cpu_util, seen: (r) => -r.last_seen_ms, phi: (r) => r.phi,
    }[this.sortKey];
    const va = value(ra), vb = value(rb);
    const order = typeof va === "string" ? va.localeCompare(vb) : va - vb;
    return this.sortDir * (order || ra.agent.localeCompare(rb.agent));
  }

  // Data changed. The order is kept while the pointer is on the table, unless the reader asked (force).
  refresh(force = false) {
    if (this.hovering && !force) {
      this.frozenEl.hidden = false;
      this.order = this.order.filter((i) => this.store.has(i));
    } else {
      this.order = this.store.indexes().filter((i) => this.visible(this.store.row(i)));
      this.order.sort((a, b) => this.compare(a, b));
    }
    this.countEl.textContent = `${this.order.length} of ${this.store.size()} agents shown`;
    this.virtualizer.setOptions({ ...this.virtualizer.options, count: this.order.length });
    this.virtualizer._willUpdate();
    this.paint();
  }

  paint() {
    const items = this.virtualizer.getVirtualItems();
    this.body.style.height = `${this.virtualizer.getTotalSize()}px`;
    const keep = new Set();
    this.sparkWanted.clear();
    for (const item of items) {
      const index = this.order[item.index];
      if (index === undefined) continue;
      let row = this.pool.get(item.key);
      if (!row) {
        row = this.makeRow();
        this.pool.set(item.key, row);
        this.body.append(row.el);
      }
      keep.add(item.key);
      row.el.style.transform = `translateY(${item.start}px)`;
      this.fill(row, this.store.row(index));
    }
    for (const [key, row] of this.pool) {
      if (!keep.has(key)) {
        row.spark?.destroy();
        row.el.remove();
        this.pool.delete(key);
      }
    }
    this.requestSparks();
  }

  makeRow() {
    const cells = COLUMNS.map(([key]) => el("div", { role: "cell", class: key === "spark" ? "spark" : "" }));
    const rowEl = el("div", { class: "row", role: "row" }, ...cells);
    return { el: rowEl, cells, agent: null, spark: null, sparkData: null };
  }

  fill(row, r) {
    const [state, agent, task, status, cpu, spark, seen, phi] = row.cells;
    if (row.agent !== r.agent) {
      row.agent = r.agent;
      agent.replaceChildren(link(`/agents/${encodeURIComponent(r.agent)}`, r.agent));
      row.sparkData = null;
    }
    state.className = `state s-${r.state}`;
    state.textContent = r.reason && r.state !== "alive" && r.state !== "left" ? `${r.state} (${r.reason})` : r.state;
    const taskKey = `${r.task_id}|${r.epoch}`;
    if (task.dataset.key !== taskKey) {
      task.dataset.key = taskKey;
      task.replaceChildren(r.task_id ? link(`/tasks/${encodeURIComponent(r.task_id)}`, r.task_id) : "—",
        r.task_id ? ` (${r.epoch})` : "");
    }
    status.textContent = r.status;
    cpu.textContent = r.cpu_util.toFixed(2);
    seen.textContent = ago(r.last_seen_ms, this.store.now());
    seen.dataset.seen = r.last_seen_ms;
    phi.textContent = r.state === "left" ? "—" : r.phi.toFixed(1);
    this.sparkWanted.add(r.agent);
    const data = this.sparks.get(r.agent);
    if (data && row.sparkData !== data) {
      row.sparkData = data;
      this.drawSpark(row, spark, data.values);
    }
  }

  drawSpark(row, cell, values) {
    const xs = values.map((_, i) => i);
    const ys = values.map((v) => (v === null ? null : v));
    if (!row.spark) {
      row.spark = new uPlot({
        width: 96, height: 22, legend: { show: false }, cursor: { show: false }, select: { show: false },
        scales: { x: { time: false }, y: { range: [0, 1] } }, axes: [{ show: false }, { show: false }],
        series: [{}, { stroke: "#1d4f91", width: 1.5, spanGaps: false }],
      }, [xs, ys], cell);
    } else {
      row.spark.setData([xs, ys]);
    }
  }

  requestSparks() {
    if (this.sparkTimer) return;
    this.sparkTimer = setTimeout(async () => {
      this.sparkTimer = null;
      const now = Date.now();
      const stale = [...this.sparkWanted].filter((a) => !this.sparks.has(a) || now - this.sparks.get(a).at > SPARK_REFRESH_MS);
      if (!stale.length) return;
      try {
        const response = await fetch(`/api/sparklines?agents=${stale.slice(0, 200).map(encodeURIComponent).join(",")}`);
        const body = await response.json();
        for (const [agent, values] of Object.entries(body.sparklines || {})) this.sparks.set(agent, { at: now, values });
        this.paint();
      } catch {
        // the connection banner says what is wrong; sparklines come back with it
      }
    }, 300);
  }

  tick() {  // relative times tick without any message
    const now = this.store.now();
    for (const row of this.pool.values()) {
      const cell = row.cells[6];
      if (cell.dataset.seen) cell.textContent = ago(Number(cell.dataset.seen), now);
    }
    this.requestSparks();
  }
}
