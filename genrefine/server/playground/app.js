// The genrefine playground: streams one method, or races two, through the server's own
// OpenAI-compatible routes with "genrefine_provenance": true, and colours each piece of text by
// where its tokens came from (accepted draft tokens vs the target's own token). Nothing is
// fetched from anywhere but this server.
//
// Query parameters prefill the form (and make a run reproducible, e.g. for a headless browser):
//   prompt, method, race (the second method), max_tokens, temperature, chat (0|1), autorun (1).
"use strict";

const $ = (id) => document.getElementById(id);
let methods = {};  // id -> {lossless, summary, available, reason}

async function loadMethods() {
  const r = await fetch("/v1/genrefine/methods");
  const body = await r.json();
  for (const sel of [$("method"), $("method2")]) {
    for (const m of body.data) {
      const opt = document.createElement("option");
      opt.value = m.id;
      opt.textContent = m.id + (m.lossless ? "" : " (lossy)");
      opt.title = m.available ? m.summary : m.reason;
      opt.disabled = !m.available;
      sel.appendChild(opt);
    }
  }
  for (const m of body.data) methods[m.id] = m;
  $("method").value = body.default;
  $("method2").value = body.data.some((m) => m.id === "ar") ? "ar" : body.default;
  const models = await (await fetch("/v1/models")).json();
  if (models.data && models.data.length) $("model").textContent = models.data[0].id;
}

function applyQuery() {
  const q = new URLSearchParams(location.search);
  if (q.has("prompt")) $("prompt").value = q.get("prompt");
  if (q.has("method")) $("method").value = q.get("method");
  if (q.has("race")) { $("race").checked = true; $("method2").disabled = false; $("method2").value = q.get("race"); }
  if (q.has("max_tokens")) $("max_tokens").value = q.get("max_tokens");
  if (q.has("temperature")) $("temperature").value = q.get("temperature");
  if (q.has("chat")) $("chat").checked = q.get("chat") !== "0";
  return q.get("autorun") === "1";
}

// ------------------------------------------------------------------ one lane: one method's stream
class Lane {
  constructor(method) {
    this.el = $("lane-template").content.firstElementChild.cloneNode(true);
    this.el.dataset.method = method;
    this.q = (cls) => this.el.querySelector("." + cls);
    this.q("lane-method").textContent = method;
    const m = methods[method];
    this.q("lane-kind").textContent = m ? (m.lossless ? "lossless" : "lossy") : "";
    this.method = method;
    this.tokens = 0;      // tokens received (the pieces' counts)
    this.accepted = 0;    // of them, accepted draft tokens
    this.perStep = new Map();  // step (>= 1) -> accepted draft tokens
    this.t0 = 0;
    this.tFirst = 0;
  }

  piece(text, info) {
    const span = document.createElement("span");
    span.textContent = text;
    if (info) {
      const draft = info.accepted > 0;
      span.className = "tok " + (draft ? "tok-draft" : info.tokens ? "tok-target" : "tok-held");
      span.dataset.tokens = info.tokens;
      span.dataset.accepted = info.accepted;
      span.dataset.step = info.step;
      if (info.drafter) span.dataset.drafter = info.drafter;
      const n = info.tokens === 1 ? "1 token" : info.tokens + " tokens";
      span.title = draft
        ? `step ${info.step}: ${n} drafted by ${info.drafter}, accepted by the target`
        : info.step === 0 ? "the prefill's first token (the target's own)"
        : info.tokens === 0 ? "text held back until the end"
        : `step ${info.step}: the target's own token` +
          (info.drafter ? ` (after ${info.drafter}'s draft)` : " (nothing drafted)");
      this.tokens += info.tokens;
      this.accepted += info.accepted;
      if (info.step > 0) this.perStep.set(info.step, (this.perStep.get(info.step) || 0) + info.accepted);
    }
    if (text || info) this.q("output").appendChild(span);
    if (!this.tFirst) this.tFirst = performance.now();
    this.figures();
  }

  figures() {
    const steps = this.perStep.size;
    const secs = (performance.now() - this.t0) / 1000;
    this.q("f-tokens").textContent = this.tokens;
    this.q("f-accepted").textContent = this.accepted;
    this.q("f-steps").textContent = steps;
    this.q("f-tps").textContent = secs > 0 ? (this.tokens / secs).toFixed(1) : "–";
    // as the library counts it: tokens after the prefill's first, per target forward
    this.q("f-tpstep").textContent = steps ? (Math.max(this.tokens - 1, 0) / steps).toFixed(2) : "–";
    this.histogram();
  }

  histogram() {
    const hist = [];
    for (const k of this.perStep.values()) {
      while (hist.length <= k) hist.push(0);
      hist[k] += 1;
    }
    const top = Math.max(1, ...hist);
    const box = this.q("hist");
    box.replaceChildren();
    hist.forEach((count, k) => {
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.dataset.accepted = k;
      bar.dataset.count = count;
      bar.title = `${count} step${count === 1 ? "" : "s"} accepted ${k} draft token${k === 1 ? "" : "s"}`;
      const c = document.createElement("span");
      c.className = "count";
      c.textContent = count;
      const fill = document.createElement("div");
      fill.className = "fill";
      fill.style.height = (70 * count / top) + "%";
      const label = document.createElement("span");
      label.className = "label";
      label.textContent = k;
      bar.append(c, fill, label);
      box.appendChild(bar);
    });
  }

  finish(usage) {
    const spec = usage && usage.speculative;
    this.el.dataset.usageCompletionTokens = usage ? usage.completion_tokens : "";
    this.el.dataset.usageAccepted = spec ? spec.accepted : "";
    this.el.dataset.usageDrafted = spec ? spec.drafted : "";
    this.el.dataset.usageSteps = spec ? spec.steps : "";
    let line = `done in ${((performance.now() - this.t0) / 1000).toFixed(2)} s`;
    if (spec) {
      const rate = spec.acceptance_rate === null ? "nothing drafted"
        : `${spec.accepted} of ${spec.drafted} drafted tokens accepted (${(100 * spec.acceptance_rate).toFixed(0)}%)`;
      line += ` · server: ${spec.tokens_per_step.toFixed(2)} tokens/step, ${rate}`;
    }
    this.q("status").textContent = line;
    this.el.dataset.state = "done";
  }

  fail(message) {
    this.q("status").textContent = message;
    this.el.dataset.state = "error";
  }

  async run(request) {
    this.t0 = performance.now();
    this.el.dataset.state = "running";
    this.q("status").textContent = "waiting for the first token…";
    const body = Object.assign({}, request.body, {
      method: this.method, stream: true, stream_options: { include_usage: true },
      genrefine_provenance: true,
    });
    let r;
    try {
      r = await fetch(request.url, {
        method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body),
      });
    } catch (e) {
      return this.fail("the server did not answer: " + e);
    }
    if (!r.ok) {
      let msg = `HTTP ${r.status}`;
      try { msg += ": " + (await r.json()).error.message; } catch (e) { /* not JSON */ }
      return this.fail(msg);
    }
    this.q("status").textContent = "streaming…";
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    let usage = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) return this.fail(chunk.error.message);
          if (chunk.usage) usage = chunk.usage;
          const choice = chunk.choices && chunk.choices[0];
          if (!choice) continue;
          const text = request.chat ? (choice.delta.content || "") : (choice.text || "");
          if (chunk.genrefine || text) this.piece(text, chunk.genrefine);
        }
      }
    }
    this.figures();
    this.finish(usage);
  }
}

// ------------------------------------------------------------------ the form
async function run(ev) {
  if (ev) ev.preventDefault();
  const prompt = $("prompt").value;
  if (!prompt) return;
  const chat = $("chat").checked;
  const common = {
    max_tokens: parseInt($("max_tokens").value, 10) || 128,
    temperature: parseFloat($("temperature").value) || 0,
  };
  const request = chat
    ? { chat, url: "/v1/chat/completions", body: Object.assign({ messages: [{ role: "user", content: prompt }] }, common) }
    : { chat, url: "/v1/completions", body: Object.assign({ prompt }, common) };
  const names = [$("method").value];
  if ($("race").checked) names.push($("method2").value);
  const lanes = names.map((m) => new Lane(m));
  $("lanes").replaceChildren(...lanes.map((l) => l.el));
  $("run").disabled = true;
  document.body.dataset.state = "running";
  try {
    await Promise.all(lanes.map((l) => l.run(request)));
  } finally {
    $("run").disabled = false;
    document.body.dataset.state = "done";
  }
}

$("race").addEventListener("change", () => { $("method2").disabled = !$("race").checked; });
$("form").addEventListener("submit", run);

loadMethods().then(() => {
  if (applyQuery()) run();
}).catch((e) => {
  document.body.dataset.state = "error";
  $("lanes").textContent = "could not load the methods: " + e;
});
