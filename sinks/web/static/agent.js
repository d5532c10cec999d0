// An agent's page (Alertmanager's generatorURL points here): its state and why, CPU trend and beats per
// window over its window rows, gaps, its tasks with epochs, and the events that concern it.

import uPlot from "./vendor/uplot/uPlot.esm.js";
import { ago, clock, describe, el, link } from "./format.js";

const REFETCH_MS = 5000;

async function json(url) {
  const response = await fetch(url);
  return response.ok ? response.json() : null;
}

export function showAgent(view, agentId, store) {
  let closed = false;
  const charts = [];
  const facts = el("dl", { class: "facts" });
  const cpu = el("div", { class: "chart", id: "agent-cpu" });
  const beats = el("div", { class: "chart", id: "agent-beats" });
  const windows = el("table", { class: "plain" });
  const tasks = el("table", { class: "plain" });
  const log = el("ol", { class: "events" });
  view.replaceChildren(
    el("a", { href: "/", "data-route": "", class: "back", text: "← fleet" }),
    el("h2", { text: `Agent ${agentId}` }), facts,
    el("section", { class: "panel" }, el("h3", { text: "CPU per window (mean, min, max, p95)" }), cpu),
    el("section", { class: "panel" }, el("h3", { text: "Beats per window" }), beats),
    el("section", { class: "panel" }, el("h3", { text: "Windows (gaps)" }), windows),
    el("section", { class: "panel" }, el("h3", { text: "Tasks" }), tasks),
    el("section", { class: "panel" }, el("h3", { text: "Events" }), log),
  );

  function renderFacts() {
    const row = store.byName(agentId);
    if (!row) {
      facts.replaceChildren(el("dt", { text: "state" }), el("dd", { text: "not known (yet)" }));
      return;
    }
    const pairs = [
      ["state", el("span", { class: `state s-${row.state}`, text: row.state })],
      ["why", row.reason || "—"], ["since", `${clock(row.state_since_ms)} (${ago(row.state_since_ms, store.now())})`],
      ["status", row.status],
      ["task", row.task_id ? link(`/tasks/${encodeURIComponent(row.task_id)}`, `${row.task_id} (epoch ${row.epoch})`) : "—"],
      ["CPU now", row.cpu_util.toFixed(3)], ["last seen", ago(row.last_seen_ms, store.now())], ["phi", row.phi.toFixed(2)],
    ];
    facts.replaceChildren(...pairs.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", {}, v)]));
  }

  function chart(node, series, data, bars = false) {
    const opts = {
      width: Math.max(300, node.clientWidth || 600), height: 180,
      scales: { y: { range: bars ? (u, min, max) => [0, Math.max(1, max)] : [0, 1] } },
      series: [{}, ...series.map(([label, stroke]) => ({
        label, stroke, width: bars ? 0 : 1.5, fill: bars ? stroke : undefined,
        paths: bars ? uPlot.paths.bars({ size: [0.7] }) : undefined, points: { show: false },
      }))],
    };
    const plot = new uPlot(opts, data, node);
    charts.push(plot);
    return plot;
  }

  let cpuPlot = null, beatsPlot = null;
  async function refetch() {
    const [agent, events, tasksFound] = await Promise.all([
      json(`/api/agents/${encodeURIComponent(agentId)}`),
      json(`/api/events?agent=${encodeURIComponent(agentId)}&limit=100`),
      Promise.all(["running", "orphaned", "assigned"].map((s) => json(`/api/tasks?state=${s}`))),
    ]);
    if (closed) return;
    const rows = agent?.windows || [];
    const xs = rows.map((r) => r.window_start_ms / 1000);
    const cpuData = [xs, rows.map((r) => r.cpu_mean), rows.map((r) => r.cpu_min), rows.map((r) => r.cpu_max),
      rows.map((r) => r.cpu_p95)];
    const beatData = [xs, rows.map((r) => r.beats)];
    if (cpuPlot) { cpuPlot.setData(cpuData); beatsPlot.setData(beatData); } else {
      cpuPlot = chart(cpu, [["mean", "#1d4f91"], ["min", "#8fb0d8"], ["max", "#b3261e"], ["p95", "#8a5a00"]], cpuData);
      beatsPlot = chart(beats, [["beats", "#7aa6d6"]], beatData, true);
    }
    windows.replaceChildren(el("tr", {}, ...["window", "beats", "longest gap", "CPU mean", "state"].map((t) => el("th", { text: t }))),
      ...rows.slice().reverse().map((r) => el("tr", {},
        el("td", { text: clock(r.window_start_ms) }), el("td", { text: String(r.beats) }),
        el("td", { text: `${(r.longest_gap_ms / 1000).toFixed(1)} s` }), el("td", { text: r.cpu_mean.toFixed(3) }),
        el("td", { text: r.final ? r.state : "open" }))));
    const mine = tasksFound.flatMap((found) => (found?.tasks || []).filter((t) => t.owner === agentId));
    const currentTask = store.byName(agentId)?.task_id;
    if (currentTask && !mine.some((t) => t.task_id === currentTask)) {
      mine.unshift({ task_id: currentTask, epoch: store.byName(agentId).epoch, state: "running", owner: agentId });
    }
    tasks.replaceChildren(el("tr", {}, ...["task", "epoch", "state"].map((t) => el("th", { text: t }))),
      ...mine.map((t) => el("tr", {}, el("td", {}, link(`/tasks/${encodeURIComponent(t.task_id)}`, t.task_id)),
        el("td", { text: String(t.epoch) }), el("td", { text: t.state }))));
    const items = (events?.events || []).map((e) => ({ kind: e.type, at: e.detected_at_ms, agent: e.agent_id,
      task: e.task_id, reason: e.reason, figures: e.figures, count: e.agent_ids.length }));
    log.replaceChildren(...items.reverse().map((e) => el("li", {}, el("time", { text: clock(e.at) }), ...describe(e))));
  }

  renderFacts();
  refetch();
  const timer = setInterval(() => { renderFacts(); refetch(); }, REFETCH_MS);
  return {
    update(items) {
      renderFacts();
      if (items?.some((e) => e.agent === agentId)) refetch();
    },
    close() { closed = true; clearInterval(timer); charts.forEach((c) => c.destroy()); },
  };
}
