// A task's page: owner, epoch, state and its whole history (who held it, when it was fenced and handed on).

import { ago, clock, el, link } from "./format.js";

const REFETCH_MS = 2000;

export function showTask(view, taskId) {
  let closed = false;
  const facts = el("dl", { class: "facts" });
  const history = el("table", { class: "plain" });
  view.replaceChildren(
    el("a", { href: "/", "data-route": "", class: "back", text: "← fleet" }),
    el("h2", { text: `Task ${taskId}` }), facts,
    el("section", { class: "panel" }, el("h3", { text: "History" }), history),
  );

  async function refetch() {
    const response = await fetch(`/api/tasks/${encodeURIComponent(taskId)}`);
    if (closed) return;
    if (!response.ok) {
      facts.replaceChildren(el("dt", { text: "task" }), el("dd", { text: "not known: no agent reports it, nothing happened to it" }));
      history.replaceChildren();
      return;
    }
    const t = await response.json();
    const agentLink = (a) => (a ? link(`/agents/${encodeURIComponent(a)}`, a) : "—");
    facts.replaceChildren(...[
      ["state", el("span", { class: "state", text: t.state })], ["owner", agentLink(t.owner)], ["epoch", String(t.epoch)],
      ["since", `${clock(t.since_ms)} (${ago(t.since_ms)})`],
      ...(t.assign_deadline_ms ? [["assignment expires", clock(t.assign_deadline_ms)]] : []),
    ].flatMap(([k, v]) => [el("dt", { text: k }), el("dd", {}, v)]));
    history.replaceChildren(el("tr", {}, ...["when", "epoch", "what", "agent", "why"].map((h) => el("th", { text: h }))),
      ...t.history.map((c) => el("tr", {}, el("td", { text: clock(c.at_ms) }), el("td", { text: String(c.epoch) }),
        el("td", { text: c.what }), el("td", {}, agentLink(c.agent_id)), el("td", { text: c.why }))));
  }

  refetch();
  const timer = setInterval(refetch, REFETCH_MS);
  return {
    update(items) { if (items?.some((e) => e.task === taskId)) refetch(); },
    close() { closed = true; clearInterval(timer); },
  };
}
