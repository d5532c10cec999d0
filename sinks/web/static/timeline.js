// The last hour at a glance: the fleet's state counts, stacked, sampled every 10 s by the server, with the
// mass-silence and pipeline-lag episodes shaded so an incident's shape shows.

import uPlot from "./vendor/uplot/uPlot.esm.js";

const HOUR_S = 3600;
// drawn in this order, each over the ones before: the stack reads stalled at the bottom, alive on top
const LAYERS = [
  ["alive", "#9fd3ad"], ["recovered", "#9cbfe6"], ["suspect", "#f0cf80"], ["stalled", "#e39893"],
];
const POINT = { alive: 1, suspect: 2, stalled: 3, recovered: 4, left: 5 };
const EPISODES = { mass_silence: "mass_silence_cleared", pipeline_lag: "pipeline_caught_up" };

export class Timeline {
  constructor(node) {
    this.node = node;
    this.points = [];
    this.episodes = [];  // [startS, endS or null, kind]
    this.plot = null;
  }

  load(points, events) {
    this.points = points.slice();
    this.episodes = [];
    this.events(events);
    this.draw();
  }

  add(point) {
    this.points = this.points.filter((p) => p[0] !== point[0]).concat([point]);
    const cutoff = point[0] / 1000 - HOUR_S;
    this.points = this.points.filter((p) => p[0] / 1000 >= cutoff);
    this.draw();
  }

  events(items) {
    for (const e of items) {
      if (EPISODES[e.kind]) this.episodes.push([e.at / 1000, null, e.kind]);
      for (const [start, end] of Object.entries(EPISODES)) {
        if (e.kind === end) {
          const open = this.episodes.find((ep) => ep[2] === start && ep[1] === null);
          if (open) open[1] = e.at / 1000;
        }
      }
    }
    this.plot?.redraw();
  }

  data() {
    const xs = this.points.map((p) => p[0] / 1000);
    const raw = Object.fromEntries(LAYERS.map(([state]) => [state, this.points.map((p) => p[POINT[state]])]));
    // cumulative from the bottom (stalled) up, so that each layer is its own band
    const order = LAYERS.map(([s]) => s).reverse();
    const cumulative = {};
    let below = xs.map(() => 0);
    for (const state of order) {
      below = below.map((v, i) => v + raw[state][i]);
      cumulative[state] = below;
    }
    return { xs, raw, series: LAYERS.map(([state]) => cumulative[state]) };
  }

  draw() {
    const { xs, raw, series } = this.data();
    this.raw = raw;
    if (this.plot) {
      this.plot.setData([xs, ...series]);
      return;
    }
    const width = Math.max(300, this.node.clientWidth || 600);
    this.plot = new uPlot({
      width, height: 170,
      scales: {
        x: { time: true, range: () => [Date.now() / 1000 - HOUR_S, Date.now() / 1000] },  // always the last hour
        y: { range: (u, min, max) => [0, Math.max(1, max)] },
      },
      series: [{}, ...LAYERS.map(([state, colour], k) => ({
        label: state, stroke: colour, fill: colour, width: 1, points: { show: false },
        value: (u, v, si, i) => (i === null || i === undefined ? "—" : String(this.raw[LAYERS[k][0]][i] ?? "—")),
      }))],
      axes: [{}, { size: 40 }],
      hooks: { drawClear: [(u) => this.shade(u)] },
    }, [xs, ...series], this.node);
    new ResizeObserver(() => this.plot.setSize({ width: Math.max(300, this.node.clientWidth), height: 170 }))
      .observe(this.node);
  }

  shade(u) {
    const { ctx } = u;
    const top = u.bbox.top, height = u.bbox.height;
    for (const [start, end, kind] of this.episodes) {
      const x0 = u.valToPos(start, "x", true);
      const x1 = u.valToPos(end ?? Date.now() / 1000, "x", true);
      ctx.fillStyle = kind === "mass_silence" ? "rgba(179,38,30,.15)" : "rgba(138,90,0,.15)";
      ctx.fillRect(x0, top, Math.max(2, x1 - x0), height);
    }
  }
}
