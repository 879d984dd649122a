// The llmq dashboard: polls /api/v1/dashboard every two seconds and renders it; sends a test request,
// shows a message, replays and purges dead letters, through the same JSON API any client uses. With API
// keys configured it asks for one and keeps it for this tab only (sessionStorage).
"use strict";

const EVERY_MS = 2000;
const TERMINAL = new Set(["completed", "failed", "expired", "cancelled", "dead"]);
const $ = (sel) => document.querySelector(sel);

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  const key = sessionStorage.getItem("llmq-key");
  if (key) headers.Authorization = `Bearer ${key}`;
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    ...options,
    headers,
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
  });
  if (response.status === 401) {
    $("#key-form").hidden = false;
    throw new Unauthorized("an API key is needed");
  }
  const doc = await response.json();
  if (!response.ok) throw new Error(doc.error || `HTTP ${response.status}`);
  return doc;
}

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "–" : String(text);
  if (cls) td.className = cls;
  return td;
}

function fill(table, rows) {
  const body = $(`${table} tbody`);
  const fresh = rows.map((cells) => {
    const tr = document.createElement("tr");
    tr.append(...cells);
    return tr;
  });
  // Rows that did not change stay as they are: a keyboard user's focus, a screen reader's place, kept.
  if (fresh.map((tr) => tr.outerHTML).join("") === body.innerHTML) return;
  // Rows that did: the focused row's button (its label names it alone) gets the focus back.
  const focused = body.contains(document.activeElement) ? document.activeElement.getAttribute("aria-label") : null;
  body.replaceChildren(...fresh);
  if (focused) [...body.querySelectorAll("button")].find((b) => b.getAttribute("aria-label") === focused)?.focus();
}

const ms = (v) => (v === null || v === undefined ? null : v < 1000 ? `${v.toFixed(1)} ms` : `${(v / 1000).toFixed(2)} s`);
const secs = (v) => (v === null || v === undefined ? null : `${v.toFixed(1)} s`);
const when = (t) => new Date(t * 1000).toLocaleTimeString();

function idButton(id) {
  const td = document.createElement("td");
  const button = document.createElement("button");
  button.type = "button";
  button.className = "link";
  button.textContent = "…" + id.slice(-12);
  button.setAttribute("aria-label", `show message ${id}`);
  button.addEventListener("click", () => show(id));
  td.append(button);
  return td;
}

function circuitCell(c) {
  if (c.state === "unknown") return cell("no dispatcher", "muted");
  const of = c.of > 1 ? ` in ${c.dispatchers} of ${c.of} dispatchers` : "";
  if (c.state === "open") return cell(`open${of} (${c.failures} failures)`, "bad");
  if (c.state === "cooling") return cell(`cooling${of} until ${when(c.until)}`, "warn");
  return cell(c.failures ? `closed (${c.failures} failures)` : "closed", "ok");
}

function render(doc) {
  const archive = doc.archive;
  fill("#levels", doc.levels.map((lv) => {
    const seen = archive && archive.levels[lv.level];
    const p99 = seen ? seen.wait_p99_ms : null;
    const slo = lv.max_wait_time_s * 1000;
    return [
      cell(lv.level),
      cell(lv.depth, "num depth"),
      cell(`${lv.inflight} / ${lv.max_concurrent ?? "–"}`, "num"),
      cell(secs(lv.oldest_age_s), "num"),
      cell(seen ? ms(seen.wait_p50_ms) : null, "num"),
      cell(seen ? ms(p99) : null, p99 === null ? "num" : p99 <= slo ? "num ok" : "num bad"),
      cell(ms(slo), "num"),
      cell(seen ? seen.per_min.toFixed(1) : archive ? "0.0" : null, "num throughput"),
      cell(seen ? ms(seen.ttft_p50_ms) : null, "num"),
      cell(lv.paused ? "paused" : "–", lv.paused ? "warn" : ""),
    ];
  }));
  fill("#backends", doc.backends.map((b) => {
    const seen = archive && archive.backends[b.name];
    return [
      cell(b.name),
      cell(`${b.running} / ${b.slots}${b.adaptive ? " (auto)" : ""}`, "num running"),
      circuitCell(b.circuit),
      cell(b.held ? `held: ${b.held}` : "taking calls", b.held ? "warn" : "ok"),
      cell(seen ? ms(seen.latency_p50_ms) : null, "num"),
      cell(seen ? ms(seen.latency_p99_ms) : null, "num"),
      cell(seen ? `${(100 * seen.error_rate).toFixed(1)}%` : null, seen && seen.error_rate > 0.05 ? "num bad" : "num"),
      cell(seen ? seen.calls : null, "num"),
    ];
  }));
  fill("#streams", doc.streams.map((st) => [
    idButton(st.id), cell(st.level), cell(st.backend), cell(secs(st.running_s), "num"),
    cell(st.ttft_ms === null ? "waiting" : ms(st.ttft_ms), "num ttft"), cell(st.chunks, "num chunks"),
  ]));
  const shown = doc.streams.length < doc.streams_total ? `, the ${doc.streams.length} oldest shown` : "";
  $("#streams-count").textContent = `(${doc.streams_total}${shown})`;
  fill("#batches", archive ? archive.batches.map((b) => {
    const done = b.completed + b.failed;
    const progress = document.createElement("td");
    const bar = document.createElement("progress");
    bar.max = b.total;
    bar.value = done;
    bar.setAttribute("aria-label", `batch ${b.id}: ${done} of ${b.total} lines ended`);
    progress.append(bar);
    const ended = ["completed", "failed", "expired", "cancelled"].includes(b.status);
    const cls = b.status === "completed" ? "ok" : ended ? "warn" : "";
    return [
      cell(b.id), cell(b.status, `status ${cls}`), cell(b.level), cell(b.tenant), progress, cell(b.fed, "num"),
      cell(b.completed, "num completed"), cell(b.failed, "num"), cell(b.total, "num"), cell(when(b.expires_at)),
    ];
  }) : []);
  const tenants = archive ? archive.tenants : [];
  const allTokens = archive ? archive.tokens_total : 0;
  fill("#tenants", tenants.map((t) => [
    cell(t.tenant === null ? "(none)" : t.tenant), cell(t.weight, "num"), cell(t.finished, "num"),
    cell(t.tokens, "num"), cell(allTokens ? `${((100 * t.tokens) / allTokens).toFixed(1)}%` : null, "num share"),
  ]));
  for (const span of document.querySelectorAll(".window")) span.textContent = `${Math.round(doc.window_s / 60)} min`;
  fill("#groups", doc.groups.map((g) => [
    cell(g.stream), cell(g.group), cell(g.consumers, "num"), cell(g.pending, "num"), cell(g.lag, "num"),
  ]));
  fill("#recent", archive ? archive.recent.map((m) => [
    idButton(m.id), cell(m.level), cell(m.status, m.status === "completed" ? "ok" : "bad"), cell(m.tenant),
    cell(m.backend), cell(ms(m.queue_wait_ms), "num"), cell(ms(m.latency_ms), "num"), cell(when(m.finished_at)),
  ]) : []);
  $("#dlq-count").textContent = `(${doc.dead_letters})`;
  const levels = $("#try-level");
  if (!levels.options.length) {
    for (const lv of doc.levels) levels.add(new Option(lv.level, lv.level, false, lv.level === "high"));
  }
  $("#updated").textContent = `updated ${when(doc.at)}${archive ? "" : " · archive not readable: no rates"}`;
}

async function renderDeadLetters() {
  const letters = await api("/api/v1/dlq?limit=20");
  fill("#dlq", letters.map((dl) => {
    const act = document.createElement("td");
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = "Replay";
    // (the entry id makes the label unique: one message may have several letters, a letter no readable message)
    button.setAttribute("aria-label", `replay message ${dl.message_id ?? "(unreadable)"}, dead letter ${dl.entry_id}`);
    button.addEventListener("click", async () => {
      if (!(await confirmed(`Replay message ${dl.message_id}? It is queued again in ${dl.level}.`))) return;
      await act_(() => api(`/api/v1/dlq/${encodeURIComponent(dl.entry_id)}/replay`, { method: "POST" }));
    });
    act.append(button);
    return [dl.message_id ? idButton(dl.message_id) : cell(null), cell(when(dl.at)), cell(dl.reason), act];
  }));
}

async function act_(work) {
  try {
    await work();
  } catch (err) {
    $("#try-status").textContent = `error: ${err.message}`;
  }
  await tick();
}

function confirmed(text) {
  const dialog = $("#confirm");
  $("#confirm-text").textContent = text;
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
  });
}

async function show(id) {
  const detail = $("#detail");
  try {
    const d = await api(`/api/v1/dashboard/messages/${encodeURIComponent(id)}`);
    const m = d.message;
    const dl = document.createElement("dl");
    const add = (name, value) => {
      if (value === null || value === undefined) return;
      const dt = document.createElement("dt");
      const dd = document.createElement("dd");
      dt.textContent = name;
      if (value instanceof Node) {
        dd.append(value);
      } else if (typeof value === "object") {
        const pre = document.createElement("pre");
        pre.textContent = JSON.stringify(value, null, 2);
        dd.append(pre);
      } else {
        dd.textContent = String(value);
      }
      dl.append(dt, dd);
    };
    add("id", m.id);
    add("status", m.status);
    add("level", m.level);
    add("attempts", m.attempts);
    add("backend", m.backend);
    add("tenant", d.tenant);
    add("model", d.model);
    for (const k of ["enqueued_at", "scheduled_at", "started_at", "finished_at", "retry_at"]) {
      if (m[k]) add(k.replace("_at", "").replace("_", " "), new Date(m[k] * 1000).toISOString());
    }
    add("time to first token", ms(m.first_token_ms));
    add("position", m.position);
    add("error", m.error);
    if (m.errors) {
      const ol = document.createElement("ol");
      ol.className = "attempts";
      ol.append(...m.errors.map((line) => {
        const li = document.createElement("li");
        li.textContent = line;
        return li;
      }));
      add("failed attempts", ol);
    }
    add("request", d.request ?? d.request_note);
    const reply = m.result && m.result.choices && m.result.choices[0] && m.result.choices[0].message;
    add("reply", reply ? reply.content : null);
    add("response", m.result);
    detail.replaceChildren(dl);
  } catch (err) {
    detail.textContent = err instanceof Unauthorized ? "an API key is needed" : `error: ${err.message}`;
  }
}

async function tryRequest(event) {
  event.preventDefault();
  const status = $("#try-status");
  const body = {
    level: $("#try-level").value,
    request: { model: $("#try-model").value, messages: [{ role: "user", content: $("#try-prompt").value }] },
  };
  try {
    const accepted = await api("/api/v1/messages", { method: "POST", body });
    status.textContent = `${accepted.id}: ${accepted.status}`;
    let seen = accepted;
    while (!TERMINAL.has(seen.status)) {
      seen = await api(`/api/v1/messages/${accepted.id}?wait=10`);
      status.textContent = `${accepted.id}: ${seen.status}`;
    }
    await show(accepted.id);
  } catch (err) {
    status.textContent = `error: ${err.message}`;
  }
}

async function tick() {
  const health = $("#health");
  try {
    const [doc, h] = await Promise.all([api("/api/v1/dashboard"), api("/api/v1/health")]);
    render(doc);
    await renderDeadLetters();
    health.textContent = `health: ${h.status}`;
    health.className = `badge ${h.status === "ok" ? "ok" : "warn"}`;
  } catch (err) {
    health.textContent = err instanceof Unauthorized ? "API key needed" : `unreachable: ${err.message}`;
    health.className = "badge bad";
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem("llmq-key", $("#key").value);
    $("#key-form").hidden = true;
    tick();
  });
  $("#try").addEventListener("submit", tryRequest);
  $("#find").addEventListener("submit", (event) => {
    event.preventDefault();
    show($("#find-id").value.trim());
  });
  $("#dlq-purge").addEventListener("click", async () => {
    if (!(await confirmed("Delete the dead letters older than 1 day? They cannot be replayed after."))) return;
    await act_(() => api("/api/v1/dlq?older_than=1d", { method: "DELETE" }));
  });
  tick();
  setInterval(tick, EVERY_MS);
});
