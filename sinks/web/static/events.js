// The event log, newest first: stalls and recoveries, mass silences and pipeline lag, reassignments and
// new owners, alerts raised and resolved, and the notifications Alertmanager delivered.

import { clock, describe, el } from "./format.js";

const SHOWN = 200;

export class EventLog {
  constructor(list) {
    this.list = list;
    this.items = [];
  }

  load(items) {
    this.items = items.slice(-SHOWN);
    this.render();
  }

  add(items) {
    this.items = this.items.concat(items).slice(-SHOWN);
    this.render();
  }

  render() {
    const rows = this.items.slice().reverse().map((e) => el("li", { class: `e-${e.kind}` },
      el("time", { datetime: new Date(e.at).toISOString(), text: clock(e.at) }), ...describe(e)));
    this.list.replaceChildren(...rows);
  }
}
