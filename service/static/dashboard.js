// codex-lb-trio dashboard: polls the admin API and redraws the server-rendered page in place.
// No build step; uPlot (vendored, see VENDORED.md) draws the charts. Data goes into the DOM
// through textContent only, never innerHTML.
"use strict";
(() => {
  const KEY_STORAGE = "codex-lb-trio.api-key";
  const POLL_MS = 1000;
  const HISTORY_MS = 10000;
  const COLORS = ["#2f5fd0", "#d0612f", "#1a7f37", "#8a3fc4", "#c2261d", "#0f8b8d", "#b26b00", "#555"];
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const keysRequired = document.body.dataset.keys === "true";
  const $ = (sel) => document.querySelector(sel);
  const charts = new Map();
  let lastAccounts = "", lastRequests = "", lastNetwork = "", timer = null, historyAt = 0;
  let emails = {};

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.className = v;
      else if (k === "style") Object.assign(el.style, v);
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }

  function notice(text, isError) {
    const el = $("#notice");
    el.textContent = text || "";
    el.className = isError ? "error" : "";
  }

  class HttpError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  async function api(path, options = {}) {
    const headers = { accept: "application/json", ...(options.headers || {}) };
    const key = sessionStorage.getItem(KEY_STORAGE);
    if (key) headers.authorization = "Bearer " + key;
    if (options.method && options.method !== "GET") headers["x-csrf-token"] = csrf;
    const response = await fetch(path, { ...options, headers, credentials: "same-origin", cache: "no-store" });
    let body = null;
    try { body = await response.json(); } catch (_) { body = null; }
    if (!response.ok) {
      const message = (body && body.error && body.error.message) || `HTTP ${response.status}`;
      if (response.status === 401 && keysRequired) askForKey(message);
      throw new HttpError(response.status, message);
    }
    return body;
  }

  // --- formatting ------------------------------------------------------------------------
  function duration(seconds) {
    seconds = Math.max(0, Math.floor(seconds));
    const d = Math.floor(seconds / 86400), hr = Math.floor((seconds % 86400) / 3600);
    const m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
    if (d) return `${d}d ${hr}h`;
    if (hr) return `${hr}h ${m}m`;
    return m ? `${m}m ${s}s` : `${s}s`;
  }
  const clock = (epoch) => new Date(epoch * 1000).toISOString().slice(11, 16) + " UTC";
  const clockSeconds = (epoch) => new Date(epoch * 1000).toISOString().slice(11, 19);
  // A row's time: the clock for today (UTC), the date before it for older rows.
  const when = (epoch) => {
    const iso = new Date(epoch * 1000).toISOString();
    return iso.slice(0, 10) === new Date().toISOString().slice(0, 10)
      ? iso.slice(11, 19) : `${iso.slice(5, 10)} ${iso.slice(11, 19)}`;
  };
  const compact = (n) => n >= 1e6 ? +(n / 1e6).toFixed(1) + "M" : n >= 1e4 ? Math.round(n / 1e3) + "k" : String(n);

  function statusText(a, now) {
    if (a.status === "cooling_down" && a.cooldown_until) return "cooling down until " + clock(a.cooldown_until);
    if (a.status === "reauth_required") return "re-login needed" + (a.status_reason ? ` (${a.status_reason})` : "");
    return String(a.status || "unknown").replace(/_/g, " ");
  }

  function windowCell(w, now) {
    if (!w) return h("td", { class: "window" }, h("span", { class: "muted" }, "unknown"));
    const used = Math.max(0, Math.min(100, Number(w.used_percent) || 0));
    const level = used >= 90 ? "high" : used >= 70 ? "mid" : "low";
    return h("td", { class: "window" },
      h("div", { class: "bar " + level, role: "meter", "aria-valuemin": 0, "aria-valuemax": 100,
        "aria-valuenow": Math.round(used), "aria-label": `${Math.round(used)}% used` },
        h("span", { style: { width: used.toFixed(1) + "%" } })),
      h("span", { class: "pct" }, `${Math.round(used)}%`), " ",
      w.reset_at ? h("span", { class: "countdown", "data-reset-at": w.reset_at },
        "resets in " + duration(w.reset_at - now)) : null);
  }

  function credits(a) {
    const c = a.credits || (a.usage && a.usage.credits);
    if (!c || typeof c !== "object") return "–";
    if (c.unlimited) return "unlimited";
    if (c.has_credits) return "balance " + (c.balance || "?");
    return "none";
  }

  // --- rendering ---------------------------------------------------------------------------
  function keepFocus(container, render) {
    const active = document.activeElement;
    const row = active && container.contains(active) ? active.closest("tr") : null;
    const where = row && { account: row.dataset.account, action: active.dataset.action };
    render();
    if (where) {
      const again = container.querySelector(`tr[data-account="${CSS.escape(where.account || "")}"] button[data-action="${where.action}"]`)
        || container.querySelector(`tr[data-account="${CSS.escape(where.account || "")}"] button`);
      if (again) again.focus();
    }
  }

  function renderAccounts(state) {
    const body = $("#account-rows");
    const key = JSON.stringify(state.accounts);
    if (key === lastAccounts) return;
    lastAccounts = key;
    emails = Object.fromEntries(state.accounts.map((a) => [a.id, a.email || a.id]));
    const now = state.now;
    const rows = state.accounts.map((a) => {
      const usage = a.usage || {};
      const paused = a.status === "paused";
      const last = a.last_error ? `${a.last_error.code} (${when(a.last_error.at)})` : "–";
      return h("tr", { "data-account": a.id },
        h("td", {}, h("strong", {}, a.email || ""), h("br"), h("small", { class: "muted" }, a.id)),
        h("td", {}, a.plan || ""),
        h("td", { class: "status s-" + a.status }, statusText(a, now)),
        windowCell(usage.primary, now), windowCell(usage.secondary, now),
        h("td", {}, credits(a)),
        h("td", { class: "num" }, a.in_flight || 0),
        h("td", {}, last),
        h("td", { class: "actions" },
          h("button", { type: "button", "data-action": paused ? "resume" : "pause" }, paused ? "Resume" : "Pause"),
          h("button", { type: "button", "data-action": "refresh" }, "Refresh tokens"),
          h("button", { type: "button", "data-action": "remove", class: "danger" }, "Remove")));
    });
    if (!rows.length) rows.push(h("tr", {}, h("td", { colspan: 9, class: "muted" },
      "No accounts yet: upload an auth.json below or run codex-lb-trio accounts import.")));
    keepFocus(body, () => body.replaceChildren(...rows));
    const select = document.querySelector('#request-filters select[name="account"]');
    const ids = state.accounts.map((a) => a.id).join(" ");
    if (select && select.dataset.ids !== ids) {  // rebuilt only when the pool changes
      select.dataset.ids = ids;
      const chosen = select.value;
      select.replaceChildren(h("option", { value: "" }, "all accounts"),
        ...state.accounts.map((a) => h("option", { value: a.id, selected: a.id === chosen }, a.id)));
    }
  }

  function renderSummary(state) {
    const s = state.summary;
    if (!s) return;
    const t = s.total || {};
    const ms = (v) => (v === null || v === undefined) ? "–" : `${Math.round(v)} ms`;
    const tiles = [["Requests (24 h)", t.requests || 0, "requests"],
      ["Error rate", `${(100 * (s.error_rate || 0)).toFixed(1)}%`, "error-rate"],
      ["Tokens (24 h)", compact((t.input_tokens || 0) + (t.output_tokens || 0)), "tokens"],
      ["TTFE p50", ms(s.ttfe_ms.p50), "p50"], ["TTFE p90", ms(s.ttfe_ms.p90), "p90"],
      ["TTFE p99", ms(s.ttfe_ms.p99), "p99"]];
    $("#tiles").replaceChildren(...tiles.map(([label, value, key]) =>
      h("div", { class: "tile" }, h("span", { class: "label" }, label),
        h("span", { class: "value", "data-tile": key }, value))));
  }

  function renderNetwork(state) {
    const key = JSON.stringify([state.clients, state.timeline]);
    if (key === lastNetwork) return;
    lastNetwork = key;
    const c = state.clients || { leases: {}, retired: [] };
    $("#generation").textContent = c.generation ?? "?";
    const retired = new Set((c.retired || []).map(String));
    const dead = new Set((c.dead || []).map(String));  // path proven dead (when published)
    const role = (g) => (retired.has(g) ? "draining" : "current") + (dead.has(g) ? ", path dead" : "");
    const gens = Object.entries(c.leases || {}).sort((a, b) => Number(a[0]) - Number(b[0]))
      .map(([g, n]) => h("tr", {}, h("td", {}, g), h("td", {}, role(g)),
        h("td", { class: "num" }, n)));
    $("#generation-rows").replaceChildren(...(gens.length ? gens : [h("tr", {}, h("td", { colspan: 3, class: "muted" }, "unknown"))]));
    const events = (state.timeline || []).map((ev) => h("li", {},
      h("time", {}, clock(ev.at)), " ", h("span", { class: "reason r-" + ev.reason }, ev.reason),
      ` generation ${ev.from_generation} → ${ev.generation}` + (ev.count > 1 ? ` (×${ev.count})` : "")));
    $("#timeline").replaceChildren(...(events.length ? events : [h("li", { class: "muted" }, "No rotation since the server started.")]));
  }

  function renderRequests(page) {
    const key = JSON.stringify(page.requests);
    if (key === lastRequests) return;
    lastRequests = key;
    const rows = page.requests.map((r) => {
      const bad = r.error_code || r.status >= 400 || r.terminal === "response.failed" || r.terminal === "error";
      return h("tr", { "data-request-id": r.request_id },
        h("td", {}, when(r.started_at)), h("td", {}, r.account_id), h("td", {}, r.surface),
        h("td", {}, r.model), h("td", { class: bad ? "bad" : "ok" }, r.error_code || r.terminal || String(r.status)),
        h("td", { class: "num" }, `${r.attempts}/${r.failovers}`), h("td", { class: "num" }, r.generation),
        h("td", { class: "num" }, r.ttfe_ms === null ? "–" : `${Math.round(r.ttfe_ms)} ms`),
        h("td", { class: "num" }, `${Math.round(r.duration_ms)} ms`),
        h("td", { class: "num" }, `${r.input_tokens}/${r.output_tokens}`));
    });
    $("#request-rows").replaceChildren(...(rows.length ? rows : [h("tr", {}, h("td", { colspan: 10, class: "muted" }, "No requests match."))]));
  }

  function renderCharts(history) {
    if (!window.uPlot || !history || !history.hourly) return;
    for (const el of document.querySelectorAll("[data-chart]")) {
      const [range, metric] = el.dataset.chart.split(":");
      const series = history[range];
      const accounts = Object.keys(series.accounts).sort();
      const data = [series.buckets, series.total[metric], ...accounts.map((a) => series.accounts[a][metric])];
      const width = Math.max(240, el.clientWidth || 320);
      const old = charts.get(el);
      const labels = ["total", ...accounts.map((a) => emails[a] || a)].join("|");
      if (old && old.labels === labels) {
        old.plot.setData(data);
        if (Math.abs(old.plot.width - width) > 4) old.plot.setSize({ width, height: 200 });
        continue;
      }
      if (old) old.plot.destroy();
      // The total as bars, each account as a line with points on top of them.
      const bars = uPlot.paths && uPlot.paths.bars ? uPlot.paths.bars({ size: [0.7, 40] }) : undefined;
      const opts = {
        width, height: 200, legend: { show: true, live: false },
        cursor: { drag: { x: false, y: false } },
        scales: { x: { time: true, range: (u, min, max) => [min - series.step / 2, max + series.step / 2] },
          y: { range: (u, min, max) => [0, Math.max(1, max * 1.1)] } },
        series: [{}, { label: "total", stroke: "#8a94a6", width: 1, fill: "rgba(138,148,166,0.35)", paths: bars, points: { show: false } },
          ...accounts.map((a, i) => ({ label: emails[a] || a, stroke: COLORS[i % COLORS.length], width: 2,
            points: { show: true, size: 5 } }))],
        axes: [{}, { size: 56, values: (u, vals) => vals.map(compact) }],
      };
      const plot = new uPlot(opts, data, el);
      charts.set(el, { plot, labels });
    }
    for (const el of document.querySelectorAll("[data-chart]")) {
      const [range, metric] = el.dataset.chart.split(":");
      el.dataset.rendered = String(history[range].total[metric].reduce((x, y) => x + y, 0));
    }
  }

  function tickCountdowns() {
    const now = Date.now() / 1000;
    for (const el of document.querySelectorAll("[data-reset-at]")) {
      const left = Number(el.dataset.resetAt) - now;
      el.textContent = left > 0 ? "resets in " + duration(left) : "reset";
    }
  }

  function filterQuery() {
    const form = $("#request-filters");
    const params = new URLSearchParams();
    if (form) for (const [k, v] of new FormData(form)) if (String(v).trim()) params.set(k, String(v).trim());
    params.set("limit", "50");
    return params.toString();
  }

  async function poll() {
    try {
      const [state, page] = await Promise.all([api("/api/dashboard"), api("/api/requests?" + filterQuery())]);
      renderAccounts(state); renderSummary(state); renderNetwork(state); renderRequests(page);
      if (Date.now() - historyAt > HISTORY_MS) {
        historyAt = Date.now();
        renderCharts(await api("/api/usage/history"));
      }
      $("#updated").textContent = "updated " + clockSeconds(state.now) + " UTC";
      if ($("#notice").className === "error" && $("#notice").dataset.source === "poll") notice("");
    } catch (err) {
      if (!(err instanceof HttpError && err.status === 401)) {
        notice("Cannot reach the server: " + err.message, true);
        $("#notice").dataset.source = "poll";
      }
    }
  }

  function start() {
    if (timer) return;
    $("#key-form").hidden = true;
    poll();
    timer = setInterval(poll, POLL_MS);
  }

  function askForKey(message) {
    sessionStorage.removeItem(KEY_STORAGE);
    if (timer) { clearInterval(timer); timer = null; }
    $("#key-form").hidden = false;
    if (message) notice(message, true);
    $("#api-key").focus();
  }

  // --- actions -------------------------------------------------------------------------------
  async function act(label, run) {
    try {
      notice(label + "…");
      const result = await run();
      notice(label + ": done");
      lastAccounts = "";
      historyAt = 0;
      await poll();
      return result;
    } catch (err) {
      notice(`${label} failed: ${err.message}`, true);
      return null;
    }
  }

  $("#account-rows").addEventListener("click", (event) => {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    const id = button.closest("tr").dataset.account;
    const action = button.dataset.action;
    const path = "/api/accounts/" + encodeURIComponent(id);
    if (action === "remove") {
      if (!confirm(`Remove account ${id} from the pool?`)) return;
      act(`Remove ${id}`, () => api(path, { method: "DELETE" }));
    } else {
      act(`${action[0].toUpperCase() + action.slice(1)} ${id}`, () => api(`${path}/${action}`, { method: "POST" }));
    }
  });

  $("#upload-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const file = $("#auth-file").files[0];
    if (!file) { notice("Choose an auth.json file first", true); return; }
    let data;
    try { data = JSON.parse(await file.text()); } catch (_) { notice(`${file.name} is not JSON`, true); return; }
    const result = await act("Import " + file.name, () => api("/api/accounts/import", {
      method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(data) }));
    if (result) {
      notice(`${result.created ? "Added" : "Updated"} ${result.account.email || result.account.id}` +
        (result.warning ? ". " + result.warning : ""));
      $("#auth-file").value = "";
    }
  });

  $("#device-login").addEventListener("click", async () => {
    const out = $("#device-result");
    let login;
    try {
      login = await api("/api/accounts/login/device", { method: "POST" });
    } catch (err) { out.textContent = "Device login failed: " + err.message; return; }
    const show = () => {
      if (login.state === "pending") {
        out.replaceChildren("Open ", h("a", { href: login.verification_url, target: "_blank", rel: "noopener noreferrer" },
          login.verification_url), " and enter ", h("span", { class: "device-code" }, login.user_code));
      } else if (login.state === "done") {
        out.textContent = "Added " + ((login.account && login.account.email) || "the account");
      } else if (login.state === "failed") {
        out.textContent = "Device login failed: " + login.error;
      }
    };
    show();
    while (login.state === "pending" || login.state === "starting") {
      await new Promise((r) => setTimeout(r, 2000));
      try { login = await api("/api/accounts/login/device/" + encodeURIComponent(login.id)); } catch (err) {
        out.textContent = "Device login status unknown: " + err.message; return;
      }
      show();
    }
    lastAccounts = "";
    poll();
  });

  const filters = $("#request-filters");
  if (filters) {
    filters.addEventListener("submit", (event) => { event.preventDefault(); lastRequests = ""; poll(); });
    filters.addEventListener("change", () => { lastRequests = ""; poll(); });
  }

  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORAGE, $("#api-key").value.trim());
    $("#api-key").value = "";
    notice("");
    start();
  });

  let resizeTimer = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => { historyAt = 0; poll(); }, 200);
  });
  setInterval(tickCountdowns, 1000);

  if (keysRequired && !sessionStorage.getItem(KEY_STORAGE)) askForKey("");
  else start();
})();
