// inferstack live dashboard: polls api/state once per interval and draws line charts on canvas.
// No dependencies, no network beyond the serving origin.
"use strict";

(function () {
  const BASE = document.body.dataset.base || "./";
  const ORDER = ["ttft", "tpot", "itl", "throughput", "requests", "routing", "queue", "kv", "prefix_hit",
    "replicas"];
  const OPTIONAL = new Set(["replicas"]);  // shown once it has data: only stacks with an autoscaler report it
  const PALETTE = ["#3b6fd8", "#e0702b", "#1a9e5c", "#b4379c", "#8a6d12", "#1595a8", "#d23c3c",
                   "#6c4fd1", "#5f7a1f", "#c25a7c"];
  const charts = {};         // id -> {meta, series: {name: [[t, v], ...]}, canvas, legend}
  const colors = {};         // series name -> color, stable across redraws
  let lastT = null;
  let historyS = 300;
  let intervalS = 1;
  const state = { updates: 0, draws: 0, lastError: null };
  window.inferstackDashboard = state;

  function colorFor(name) {
    if (!(name in colors)) colors[name] = PALETTE[Object.keys(colors).length % PALETTE.length];
    return colors[name];
  }

  function fmt(v, unit) {
    if (v === null || v === undefined) return "–";
    if (unit === "s") return v < 1 ? (v * 1000).toFixed(v < 0.01 ? 2 : 1) + " ms" : v.toFixed(2) + " s";
    if (unit === "%") return v.toFixed(1) + "%";
    if (Math.abs(v) >= 100) return v.toFixed(0) + " " + unit;
    return v.toFixed(Math.abs(v) >= 10 ? 1 : 2) + " " + unit;
  }

  function axisFmt(v, unit) {
    if (unit === "s") return fmt(v, unit).replace(" ", "");
    if (unit === "%") return v.toFixed(0) + "%";
    if (v >= 1000) return (v / 1000).toFixed(v >= 10000 ? 0 : 1) + "k";
    return v >= 10 ? v.toFixed(0) : v.toFixed(v >= 1 ? 1 : 2);
  }

  function ensureChart(id, meta) {
    if (charts[id]) return charts[id];
    const card = document.createElement("div");
    card.className = "card";
    card.id = "chart-" + id;
    const h = document.createElement("h2");
    h.textContent = meta.title + " (" + meta.unit + ")";
    const legend = document.createElement("div");
    legend.className = "legend";
    const canvas = document.createElement("canvas");
    card.append(h, legend, canvas);
    document.getElementById("charts").append(card);
    charts[id] = { meta, series: {}, canvas, legend };
    return charts[id];
  }

  function merge(chart, incoming, now) {
    for (const [name, points] of Object.entries(incoming)) {
      const s = chart.series[name] || (chart.series[name] = []);
      for (const p of points) s.push(p);
    }
    for (const [name, s] of Object.entries(chart.series)) {
      while (s.length && now - s[0][0] > historyS) s.shift();
      if (!s.length) delete chart.series[name];
    }
  }

  function draw(chart, now) {
    const { canvas, meta } = chart;
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth || 380, h = canvas.clientHeight || 190;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const left = 52, right = 8, top = 6, bottom = 20;
    const pw = w - left - right, ph = h - top - bottom;

    let t0 = Infinity, ymax = 0;
    for (const s of Object.values(chart.series)) {
      for (const [t, v] of s) {
        if (t < t0) t0 = t;
        if (v !== null && v > ymax) ymax = v;
      }
    }
    const span = Math.max(60, Math.min(historyS, now - (isFinite(t0) ? t0 : now)));
    const xmin = now - span;
    if (meta.unit === "%") ymax = 100;
    else ymax = ymax > 0 ? ymax * 1.15 : 1;
    const x = (t) => left + ((t - xmin) / span) * pw;
    const y = (v) => top + ph - (v / ymax) * ph;

    ctx.strokeStyle = "#e3e6ec";
    ctx.fillStyle = "#6b7385";
    ctx.font = "11px system-ui, sans-serif";
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let i = 0; i <= 4; i++) {
      const v = (ymax * i) / 4, yy = Math.round(y(v)) + 0.5;
      ctx.beginPath(); ctx.moveTo(left, yy); ctx.lineTo(w - right, yy); ctx.stroke();
      ctx.fillText(axisFmt(v, meta.unit), left - 4, yy);
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (let i = 0; i <= 4; i++) {
      const t = xmin + (span * i) / 4;
      ctx.fillText("-" + Math.round(now - t) + "s", x(t), h - bottom + 4);
    }

    chart.legend.replaceChildren();
    let drawn = 0;
    for (const name of Object.keys(chart.series).sort()) {
      const s = chart.series[name];
      ctx.strokeStyle = colorFor(name);
      ctx.lineWidth = 2;
      ctx.beginPath();
      let pen = false, last = null;
      for (const [t, v] of s) {
        if (v === null) { pen = false; continue; }
        const px = x(t), py = y(Math.min(v, ymax));
        if (pen) ctx.lineTo(px, py); else ctx.moveTo(px, py);
        pen = true;
        last = v;
        drawn++;
      }
      ctx.stroke();
      const item = document.createElement("span");
      const sw = document.createElement("i");
      sw.style.background = colorFor(name);
      const val = document.createElement("b");
      val.textContent = fmt(last, meta.unit);
      item.append(sw, document.createTextNode(name + " "), val);
      chart.legend.append(item);
    }
    if (!Object.keys(chart.series).length) {
      chart.legend.textContent = "no data yet — send some requests";
    }
    chart.drawnPoints = drawn;
  }

  function cell(text, cls) {
    const td = document.createElement("td");
    td.textContent = text === null || text === undefined ? "–" : String(text);
    if (cls) td.className = cls;
    return td;
  }

  function renderTable(endpoints) {
    const body = document.querySelector("#endpoints tbody");
    body.replaceChildren();
    for (const e of endpoints) {
      const tr = document.createElement("tr");
      tr.append(
        cell(e.name), cell(e.model), cell(e.state, "state-" + e.state),
        cell(e.running), cell(e.waiting),
        cell(e.kv_percent === null ? null : e.kv_percent.toFixed(1) + "%"),
        cell(e.prefix_hit_percent === null ? null : e.prefix_hit_percent.toFixed(1) + "%"),
        cell(e.restarts), cell(e.scrape_age_s === null ? null : e.scrape_age_s.toFixed(1) + " s"),
        cell(e.url),
      );
      body.append(tr);
    }
  }

  function setStatus(text, cls) {
    const el = document.getElementById("status");
    el.textContent = text;
    el.className = "status " + cls;
  }

  async function poll() {
    try {
      const r = await fetch(BASE + "api/state" + (lastT === null ? "" : "?since=" + lastT), { cache: "no-store" });
      if (!r.ok) throw new Error("HTTP " + r.status);
      const body = await r.json();
      historyS = body.history_s || historyS;
      intervalS = body.interval_s || intervalS;
      const now = body.t || Date.now() / 1000;
      for (const id of ORDER) {
        const c = body.charts[id];
        if (!c || (OPTIONAL.has(id) && !charts[id] && !Object.keys(c.series).length)) continue;
        merge(ensureChart(id, c), c.series, now);
      }
      for (const id of ORDER) if (charts[id]) draw(charts[id], now);
      renderTable(body.endpoints || []);
      if (body.t !== null) lastT = body.t;
      state.updates++;
      state.draws = ORDER.filter((id) => charts[id] && charts[id].drawnPoints > 0).length;
      const problem = body.provider_error || (body.errors && body.errors[0]);
      state.lastError = problem || null;
      if (problem) setStatus(problem, "error");
      else setStatus("live · " + body.window_s + " s windows · " + new Date(now * 1000).toLocaleTimeString(), "live");
      document.getElementById("foot").textContent =
        "Percentiles and rates over the last " + body.window_s + " s, sampled every " + intervalS +
        " s; history " + historyS + " s. Raw metrics: /metrics on the gateway and each endpoint.";
    } catch (err) {
      state.lastError = String(err);
      setStatus("disconnected: " + err.message, "stale");
    }
    setTimeout(poll, intervalS * 1000);
  }

  window.addEventListener("resize", () => {
    const now = lastT || Date.now() / 1000;
    for (const c of Object.values(charts)) draw(c, now);
  });
  poll();
})();
