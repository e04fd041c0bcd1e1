// mirrorha console: each page is a server-rendered shell filled from the REST API.
// Everything coming from a node (log lines, file contents, messages) is inserted as text
// (textContent / value), never as HTML.
"use strict";

const MODULE = document.querySelector('meta[name="module"]').content || "mirror";
const API = "/api/v1";
const COMMANDS = ["start", "stop", "restart", "swap", "prim", "second"];

function csrfToken() {
  return document.querySelector('meta[name="csrf-token"]').content;
}

function modUrl(path) {
  return `${API}/modules/${encodeURIComponent(MODULE)}${path}`;
}

function nodeUrl(node, path) {
  return modUrl(`/nodes/${encodeURIComponent(node)}${path}`);
}

// One JSON request; resolves to {status, data}. A lost session sends the browser to /login.
async function api(method, url, body) {
  const opts = {method, credentials: "same-origin", headers: {"Accept": "application/json"}};
  if (method !== "GET") opts.headers["X-CSRF-Token"] = csrfToken();
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(url, opts);
  } catch (err) {
    return {status: 0, data: {error: {code: "network", message: `console unreachable: ${err}`}}};
  }
  let data = null;
  try { data = await resp.json(); } catch (_) { data = {}; }
  if (resp.status === 401 && document.body.dataset.page !== "login") {
    location.href = `/login?next=${encodeURIComponent(location.pathname + location.search)}`;
  }
  return {status: resp.status, data};
}

function errorText(data, status) {
  const e = data && data.error;
  if (e && e.message) return e.message;
  return `request failed (HTTP ${status})`;
}

function fieldText(f) {
  if (typeof f === "string") return f;
  const where = [f.file, f.line].filter((x) => x !== undefined && x !== null && x !== "");
  const loc = where.join(":");
  const field = f.field ? `${f.field}: ` : "";
  const node = f.node ? `[${f.node}] ` : "";
  return `${node}${loc ? loc + ": " : ""}${field}${f.message || ""}`;
}

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function show(node, text, ok) {
  node.hidden = false;
  node.textContent = text;
  node.classList.toggle("ok", ok === true);
  node.classList.toggle("bad", ok === false);
}

function flash(text, ok) { show(document.getElementById("flash"), text, ok); }

function sleep(ms) { return new Promise((r) => setTimeout(r, ms)); }

// Per-node results of validate/configure: one line per node, then the field errors.
function renderResults(box, data, status) {
  box.replaceChildren();
  const nodes = (data && data.nodes) || {};
  for (const [name, r] of Object.entries(nodes)) {
    const ok = r.ok === true;
    const errs = (r.errors || []).map(fieldText);
    const text = ok ? `${name}: ${r.message || "OK"}` : `${name}: ${errs[0] || r.message || "failed"}`;
    const line = el("p", {"class": `result ${ok ? "ok" : "bad"}`, "data-testid": `result-${name}`},
                    `${ok ? "✔" : "✘"} ${text}`);
    box.append(line);
    if (r.blocker) {
      box.append(el("p", {"class": "result bad", "data-testid": `blocker-${name}`},
                    `${name}: ${r.blocker}`));
    }
    if (errs.length > 1) {
      const ul = el("ul", {"class": "errors"});
      for (const t of errs.slice(1)) ul.append(el("li", {}, t));
      box.append(ul);
    }
  }
  const err = data && data.error;
  if (err) {
    box.append(el("p", {"class": "result bad", "data-testid": "result-error"}, `✘ ${err.message}`));
    const fields = err.fields || [];
    if (fields.length) {
      const ul = el("ul", {"class": "errors", "data-testid": "field-errors"});
      for (const f of fields) ul.append(el("li", {}, fieldText(f)));
      box.append(ul);
    }
  } else if (!Object.keys(nodes).length && status >= 400) {
    box.append(el("p", {"class": "result bad", "data-testid": "result-error"},
                   `✘ ${errorText(data, status)}`));
  }
}

function allOk(data) {
  const nodes = Object.values((data && data.nodes) || {});
  return nodes.length > 0 && nodes.every((r) => r.ok === true);
}

// ---------------------------------------------------------------------------- login
async function initLogin() {
  const form = document.getElementById("login-form");
  const error = document.getElementById("login-error");
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = {username: form.username.value, password: form.password.value,
                  csrf_token: form.csrf_token.value};
    const {status, data} = await api("POST", `${API}/login`, body);
    if (status === 200) {
      location.href = form.dataset.next || "/";
    } else {
      show(error, status === 401 ? "Wrong user or password." : errorText(data, status), false);
      form.password.select();
    }
  });
}

async function logout() {
  await api("POST", `${API}/logout`);
  location.href = "/login";
}

// ------------------------------------------------------------------------ dashboard
const STATE_CLASSES = ["PRIM", "SECOND", "ALONE", "WAIT", "STOP"];

function syncText(st) {
  if (st.state === "SECOND" && !st.in_sync) {
    const p = st.resync_progress;
    return p === null || p === undefined ? "resynchronising" : `resynchronising ${p} %`;
  }
  // PRIM means a synchronised SECOND: the primary's own in_sync flag says nothing here.
  if (st.state === "PRIM") return `replicating to ${st.peer_state === "SECOND" ? "the SECOND" : "the peer"}`;
  if (st.state === "SECOND") return st.in_sync ? "in sync" : "not in sync";
  if (st.state === "ALONE") return "not replicated (peer absent)";
  return "–";
}

function stateLabel(st) {
  if (!st.reachable) return "UNREACHABLE";
  let label = st.state || "?";
  if (st.split_brain) label += " · SPLIT BRAIN";
  if (st.busy) label += ` · ${st.busy}`;
  return label;
}

function colourClass(st) {
  if (!st.reachable) return "state-unknown";
  if (st.state === "SECOND" && !st.in_sync) return "state-resync";
  return STATE_CLASSES.includes(st.state) ? `state-${st.state}` : "state-unknown";
}

function vipText(st) {
  const vips = st.vip || [];
  if (!vips.length) return "–";
  return vips.map((v) => `${v.addr} ${v.held ? "held here" : "not here"}`).join(", ");
}

class Dashboard {
  constructor() {
    this.box = document.getElementById("nodes");
    this.cards = {};
    this.firstStarted = sessionStorage.getItem("mirrorha-first-started");
    this.recommendation = null;
  }

  async start() {
    const mods = await api("GET", `${API}/modules`);
    const mod = ((mods.data && mods.data.modules) || []).find((m) => m.name === MODULE);
    if (!mod || !mod.configured) {
      const hint = document.getElementById("setup-hint");
      hint.hidden = false;
      const nodes = await api("GET", `${API}/nodes`);
      const text = document.getElementById("setup-hint-text");
      const clusterDone = nodes.data && nodes.data.configured;
      text.textContent = clusterDone
        ? "The cluster is set up; the module is not configured yet. "
        : "This node is not in a cluster yet. ";
      const a = el("a", {"href": clusterDone ? "/module" : "/cluster",
                         "data-testid": "setup-link"},
                   clusterDone ? "Configure the module →" : "Add the nodes →");
      text.append(a);
    }
    document.getElementById("start-recommended").addEventListener("click", () => this.startIt());
    document.getElementById("start-other").addEventListener("click", () => this.startOther());
    this.loop();
  }

  async loop() {
    for (;;) {
      const t0 = Date.now();
      const {status, data} = await api("GET", modUrl("/state"));
      if (status === 200) {
        this.render(data.nodes || {});
        document.getElementById("updated").textContent =
          `updated ${new Date().toLocaleTimeString()}`;
      } else {
        document.getElementById("updated").textContent = errorText(data, status);
      }
      await sleep(Math.max(0, 1000 - (Date.now() - t0)));
    }
  }

  card(name) {
    if (this.cards[name]) return this.cards[name];
    const tpl = document.getElementById("node-card").content.firstElementChild.cloneNode(true);
    tpl.dataset.testid = `node-card-${name}`;
    tpl.dataset.node = name;
    tpl.querySelector(".node-name").textContent = name;
    for (const n of tpl.querySelectorAll("[data-testid]")) {
      if (n !== tpl) n.dataset.testid = `${n.dataset.testid}-${name}`;
    }
    for (const b of tpl.querySelectorAll("button[data-cmd]")) {
      b.dataset.testid = `cmd-${name}-${b.dataset.cmd}`;
      b.addEventListener("click", () => this.command(name, b.dataset.cmd, tpl));
    }
    const logsM = tpl.querySelector(".logs-module");
    logsM.href = `/logs/${encodeURIComponent(name)}/module`;
    logsM.dataset.testid = `logs-${name}-module`;
    const logsA = tpl.querySelector(".logs-application");
    logsA.href = `/logs/${encodeURIComponent(name)}/application`;
    logsA.dataset.testid = `logs-${name}-application`;
    const snap = tpl.querySelector(".snapshot");
    snap.href = nodeUrl(name, "/snapshot");
    snap.dataset.testid = `snapshot-${name}`;
    const boot = tpl.querySelector(".boot");
    boot.dataset.testid = `boot-${name}`;
    boot.addEventListener("change", () => this.setBoot(name, boot, tpl));
    this.box.append(tpl);
    this.cards[name] = tpl;
    this.loadBoot(name, boot);
    return tpl;
  }

  render(nodes) {
    let holder = "";
    for (const [name, st] of Object.entries(nodes)) {
      const c = this.card(name);
      const badge = c.querySelector(".state");
      badge.textContent = stateLabel(st);
      badge.className = `badge state ${colourClass(st)}`;
      c.className = `node ${colourClass(st)}`;
      c.querySelector(".readiness").textContent =
        st.reachable && st.readiness ? st.readiness.replace("_", " ") : "–";
      c.querySelector(".peer-state").textContent = st.peer_state || "–";
      const prog = c.querySelector("progress");
      const resyncing = st.state === "SECOND" && !st.in_sync;
      prog.hidden = !resyncing || st.resync_progress === null || st.resync_progress === undefined;
      if (!prog.hidden) prog.value = st.resync_progress;
      c.querySelector(".sync-text").textContent = st.reachable ? syncText(st) : "–";
      c.querySelector(".vip").textContent = st.reachable ? vipText(st) : "–";
      c.querySelector(".generation").textContent = st.generation || "–";
      c.querySelector(".daemon").textContent = st.daemon || "–";
      const err = c.querySelector(".error");
      err.hidden = !st.error;
      err.textContent = st.error || "";
      if ((st.vip || []).some((v) => v.held)) {
        holder = `${(st.vip.find((v) => v.held) || {}).addr} on ${name}`;
      }
    }
    document.getElementById("vip-holder").textContent = holder || "held by no node";
    this.renderFirstStart(nodes);
  }

  // The first-start panel: every node stopped (step 1), or the node started from it
  // running while the other is still stopped (step 2).
  async renderFirstStart(nodes) {
    const panel = document.getElementById("first-start");
    const list = Object.entries(nodes);
    const configured = list.length > 0 && list.every(([, st]) => st.reachable &&
                                                     st.daemon !== "not configured");
    const allStopped = configured && list.every(([, st]) => st.state === "STOP" && !st.busy);
    const started = this.firstStarted && nodes[this.firstStarted];
    const other = list.find(([n]) => n !== this.firstStarted);
    const step2 = configured && started && other && other[1].state === "STOP" &&
                  started.state !== "STOP";
    if (allStopped) {
      this.firstStarted = null;
      sessionStorage.removeItem("mirrorha-first-started");
      if (!this.recommendation) {
        const {status, data} = await api("GET", modUrl("/recommendation"));
        if (status === 200) this.recommendation = data;
      }
      const rec = this.recommendation;
      document.getElementById("recommended-node").textContent = rec ? rec.node : "?";
      document.getElementById("recommended-why").textContent = rec ? rec.why : "";
      document.getElementById("start-recommended").disabled = !rec;
    } else if (!step2) {
      this.recommendation = null;
    }
    panel.hidden = !(allStopped || step2);
    document.getElementById("first-start-step1").hidden = !allStopped;
    document.getElementById("first-start-step2").hidden = !step2;
    if (step2) {
      document.getElementById("first-started").textContent = this.firstStarted;
      const btn = document.getElementById("start-other");
      btn.textContent = `Start ${other[0]}`;
      btn.dataset.node = other[0];
    }
  }

  async startIt() {
    const rec = this.recommendation;
    if (!rec) return;
    const msg = document.getElementById("first-start-msg");
    const {status, data} = await api("POST", nodeUrl(rec.node, "/commands/prim"));
    if (status === 200) {
      this.firstStarted = rec.node;
      sessionStorage.setItem("mirrorha-first-started", rec.node);
      show(msg, `${rec.node} started as primary`, true);
    } else {
      show(msg, `${rec.node}: ${errorText(data, status)}`, false);
    }
  }

  async startOther() {
    const node = document.getElementById("start-other").dataset.node;
    const msg = document.getElementById("first-start-msg");
    const {status, data} = await api("POST", nodeUrl(node, "/commands/start"));
    show(msg, status === 200 ? `${node} started` : `${node}: ${errorText(data, status)}`,
         status === 200);
  }

  async command(node, cmd, card) {
    const out = card.querySelector(".cmd-result");
    card.querySelector("details.menu").open = false;
    show(out, `${cmd} on ${node}…`);
    const {status, data} = await api("POST", nodeUrl(node, `/commands/${cmd}`));
    if (status === 200) show(out, `${cmd}: accepted by ${node}`, true);
    else show(out, `${cmd} refused: ${errorText(data, status)}`, false);
  }

  async loadBoot(node, box) {
    const {status, data} = await api("GET", nodeUrl(node, "/boot"));
    if (status === 200) box.checked = !!data.on;
    box.disabled = status !== 200;
  }

  async setBoot(node, box, card) {
    const want = box.checked;
    const out = card.querySelector(".cmd-result");
    const {status, data} = await api("PUT", nodeUrl(node, "/boot"), {on: want});
    if (status === 200) {
      box.checked = !!data.on;
      show(out, `start at boot ${data.on ? "on" : "off"} on ${node}`, true);
    } else {
      box.checked = !want;
      show(out, `boot: ${errorText(data, status)}`, false);
    }
  }
}

// -------------------------------------------------------------------------- cluster
async function initCluster() {
  const form = document.getElementById("cluster-form");
  const result = document.getElementById("cluster-result");
  const {status, data} = await api("GET", `${API}/nodes`);
  if (status !== 200) { show(result, errorText(data, status), false); return; }
  if (data.configured) {
    document.getElementById("cluster-configured").hidden = false;
    const body = document.getElementById("cluster-nodes");
    for (const n of data.nodes || []) {
      const tr = el("tr", {"data-testid": `cluster-node-${n.name}`});
      tr.append(el("td", {}, `${n.name}${n.local ? " (this console)" : ""}`),
                el("td", {}, n.addr),
                el("td", {}, n.reachable ? "yes" : `no${n.error ? ": " + n.error : ""}`));
      body.append(tr);
    }
    document.getElementById("cluster-next").hidden = false;
    return;
  }
  form.hidden = false;
  const rows = document.getElementById("node-rows");
  const newNode = document.getElementById("new-node");
  newNode.addEventListener("click", () => {
    const row = document.getElementById("node-row").content.firstElementChild.cloneNode(true);
    const i = rows.children.length;
    row.dataset.index = i;
    row.querySelector("legend").textContent = `Node ${i + 1}`;
    row.querySelector('[name="addr"]').dataset.testid = `node-addr-${i}`;
    row.querySelector('[name="password"]').dataset.testid = `node-password-${i}`;
    row.querySelector(".field-error").dataset.field = `nodes[${i}].addr`;
    rows.append(row);
    row.querySelector('[name="addr"]').focus();
    newNode.hidden = rows.children.length >= 2;  // a mirror cluster has exactly two nodes
  });
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const nodes = [...rows.children].map((row) => {
      const n = {addr: row.querySelector('[name="addr"]').value.trim()};
      const pw = row.querySelector('[name="password"]');
      if (pw) n.password = pw.value;
      return n;
    });
    for (const p of form.querySelectorAll(".field-error")) p.hidden = true;
    show(result, "saving: creating the cluster key and certificates…");
    const r = await api("PUT", `${API}/nodes`, {nodes});
    if (r.status === 200) {
      show(result, "✔ cluster saved on both nodes", true);
      form.hidden = true;
      setTimeout(() => location.reload(), 300);
      return;
    }
    const fields = (r.data.error && r.data.error.fields) || [];
    for (const f of fields) {
      const p = form.querySelector(`.field-error[data-field="${CSS.escape(f.field || "")}"]`);
      if (p) show(p, f.message, false);
    }
    show(result, `✘ ${errorText(r.data, r.status)}`, false);
  });
}

// --------------------------------------------------------------------------- module
function settingsFromForm() {
  const dirs = document.getElementById("replicated-dirs").value.split("\n")
    .map((s) => s.trim()).filter(Boolean);
  const vip = document.getElementById("vip").value.trim();
  const settings = {replicated_dirs: dirs, vip: vip || null};
  for (const k of ["pulse", "timeout"]) {
    const v = document.getElementById(k).value;
    if (v) settings[`${k}_ms`] = Number(v);
  }
  return settings;
}

async function initModule() {
  const results = document.getElementById("results");
  const form = document.getElementById("module-form");
  const configure = document.getElementById("configure");
  const mods = await api("GET", `${API}/modules`);
  if (mods.status !== 200) { renderResults(results, mods.data, mods.status); return; }
  const mod = (mods.data.modules || []).find((m) => m.name === MODULE);
  const fill = async () => {
    const {status, data} = await api("GET", modUrl("/config"));
    if (status !== 200) { renderResults(results, data, status); return; }
    const s = data.settings || {};
    document.getElementById("replicated-dirs").value = (s.replicated_dirs || []).join("\n");
    document.getElementById("vip").value = s.vip || "";
    document.getElementById("pulse").value = s.pulse_ms || "";
    document.getElementById("timeout").value = s.timeout_ms || "";
    document.getElementById("module-status").textContent = mod && mod.configured
      ? `Module ${MODULE} is configured; changing it here redeploys it to both nodes.`
      : `New module ${MODULE} from the mirror template: set the replicated directories and the virtual IP.`;
    form.hidden = false;
  };
  if (mod && mod.configured) {
    await fill();
  } else {
    const create = document.getElementById("module-create");
    create.hidden = false;
    document.getElementById("create-module").addEventListener("click", async () => {
      create.hidden = true;
      await fill();
    });
  }
  // Any edit after a validation must be validated again before Configure.
  form.addEventListener("input", () => { configure.disabled = true; });
  document.getElementById("validate").addEventListener("click", async () => {
    configure.disabled = true;
    results.replaceChildren(el("p", {"class": "muted"}, "validating on both nodes…"));
    const {status, data} = await api("POST", modUrl("/config/validate"),
                                     {settings: settingsFromForm()});
    renderResults(results, data, status);
    configure.disabled = !(status === 200 && allOk(data));
  });
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    configure.disabled = true;
    results.replaceChildren(el("p", {"class": "muted"}, "configuring both nodes…"));
    const {status, data} = await api("PUT", modUrl("/config"), {settings: settingsFromForm()});
    renderResults(results, data, status);
    document.getElementById("module-next").hidden = !(status === 200 && allOk(data));
  });
}

// ----------------------------------------------------------------------------- logs
async function initLogs() {
  const node = document.body.dataset.logNode;
  const kind = document.body.dataset.logKind;
  const pre = document.getElementById("log-lines");
  const follow = document.getElementById("follow");
  const status = document.getElementById("log-status");
  const links = document.getElementById("log-links");
  const nodes = await api("GET", `${API}/nodes`);
  const names = ((nodes.data && nodes.data.nodes) || []).map((n) => n.name);
  if (!names.includes(node)) names.push(node);
  for (const n of names) {
    for (const k of links.dataset.kinds.split(",")) {
      const a = el("a", {"href": `/logs/${encodeURIComponent(n)}/${k}`,
                         "data-testid": `log-link-${n}-${k}`}, `${n} · ${k}`);
      if (n === node && k === kind) a.setAttribute("aria-current", "page");
      links.append(a);
    }
  }
  const url = nodeUrl(node, `/logs/${kind}`);
  const append = (lines) => {
    if (!lines || !lines.length) return;
    const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.append(document.createTextNode(lines.map((l) => l.replace(/\n$/, "")).join("\n") + "\n"));
    if (atEnd) pre.scrollTop = pre.scrollHeight;
  };
  let {status: code, data} = await api("GET", `${url}?lines=200`);
  if (code !== 200) { show(status, errorText(data, code), false); return; }
  append(data.lines);
  let offset = data.offset;
  status.textContent = "";
  // Follow: ask for what comes after the offset; the server holds the request up to 10 s.
  for (;;) {
    if (!follow.checked) {
      await new Promise((r) => follow.addEventListener("change", r, {once: true}));
      continue;
    }
    const r = await api("GET", `${url}?offset=${offset}`);
    if (r.status === 200) {
      append(r.data.lines);
      offset = r.data.offset;
      status.textContent = "following";
    } else {
      status.textContent = errorText(r.data, r.status);
      await sleep(2000);
    }
  }
}

// ------------------------------------------------------------------------- advanced
async function initAdvanced() {
  const results = document.getElementById("results");
  const form = document.getElementById("advanced-form");
  const areas = [...form.querySelectorAll("textarea[data-file]")];
  const {status, data} = await api("GET", modUrl("/config"));
  if (status !== 200) { renderResults(results, data, status); return; }
  for (const t of areas) t.value = (data.files || {})[t.dataset.file] || "";
  const files = () => Object.fromEntries(areas.map((t) => [t.dataset.file, t.value]));
  document.getElementById("adv-validate").addEventListener("click", async () => {
    results.replaceChildren(el("p", {"class": "muted"}, "validating on both nodes…"));
    const r = await api("POST", modUrl("/config/validate"), {files: files()});
    renderResults(results, r.data, r.status);
  });
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    results.replaceChildren(el("p", {"class": "muted"}, "redeploying to both nodes…"));
    const r = await api("PUT", modUrl("/config"), {files: files()});
    renderResults(results, r.data, r.status);
  });
}

// ------------------------------------------------------------------------- dispatch
document.addEventListener("DOMContentLoaded", () => {
  const out = document.getElementById("logout");
  if (out) out.addEventListener("click", logout);
  const pages = {
    login: initLogin,
    dashboard: () => new Dashboard().start(),
    cluster: initCluster,
    module: initModule,
    logs: initLogs,
    advanced: initAdvanced,
  };
  const init = pages[document.body.dataset.page];
  if (init) init().catch((err) => flash(`console error: ${err}`, false));
});
