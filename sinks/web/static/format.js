// How times, numbers and events read on the page.

export function ago(ms, now = Date.now()) {
  if (!ms) return "never";
  const s = Math.max(0, (now - ms) / 1000);
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.floor(s % 60)} s ago`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min ago`;
}

export function clock(ms) {
  return new Date(ms).toLocaleTimeString([], { hour12: false });
}

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children) node.append(child);
  return node;
}

export function link(href, text) {
  return el("a", { href, "data-route": "", text });
}

const FIGURES = {
  silence_ms: (v) => `silent ${(v / 1000).toFixed(1)} s`, phi: (v) => `phi ${v.toFixed(1)}`,
  cpu_max: (v) => `CPU max ${v.toFixed(3)}`, running_s: (v) => `running ${Math.round(v)} s`,
  lag_s: (v) => `lag ${v.toFixed(1)} s`, episode_ms: (v) => `episode ${(v / 1000).toFixed(1)} s`,
};

export function figures(f = {}) {
  return Object.entries(f).filter(([k]) => FIGURES[k]).map(([k, v]) => FIGURES[k](v)).join(", ");
}

// One line of the event log: [text nodes and links].
export function describe(e) {
  const agent = e.agent ? link(`/agents/${encodeURIComponent(e.agent)}`, e.agent) : "";
  const task = e.task ? link(`/tasks/${encodeURIComponent(e.task)}`, e.task) : "";
  switch (e.kind) {
    case "stall": return ["stall: ", agent, ` (${e.reason}) `, task, e.figures ? ` — ${figures(e.figures)}` : ""];
    case "recovery": return ["recovered: ", agent, e.reason ? ` (from ${e.reason})` : ""];
    case "mass_silence": return [`mass silence: ${e.count} agents together (held, not reassigned)`];
    case "mass_silence_cleared": return [`mass silence over: ${e.reason}`];
    case "pipeline_lag": return [`pipeline lag: ${e.reason}`];
    case "pipeline_caught_up": return ["pipeline caught up"];
    case "assignment_expired": return ["assignment expired: ", task, " (", agent, " did not take it)"];
    case "reassigned": return ["reassigned: ", task, " taken from ", agent, ` (epoch ${e.epoch})`];
    case "assigned": return ["assigned: ", task, " to ", agent, ` (epoch ${e.epoch})`];
    case "taken_over": return ["new owner: ", task, " runs on ", agent, ` (epoch ${e.epoch})`];
    case "alert": return [`alert ${e.alert} ${e.firing ? "firing" : "resolved"}`, e.agent ? " for " : "", agent];
    case "notified": return [`Alertmanager notified (${e.status}): ${e.count} alert(s), `
      + Object.entries(e.group || {}).map(([k, v]) => `${k}=${v}`).join(" ")];
    default: return [e.kind];
  }
}
