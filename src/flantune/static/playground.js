// The playground: the base model and up to three adapters answer one input side by side, each
// answer streamed as it is generated (POST /v1/completions with stream: true, server-sent events).
// Plain DOM and fetch, no build step; model text is only ever set as textContent.
"use strict";

const MAX_ADAPTERS = 3;
const $ = (id) => document.getElementById(id);
let baseName = null; // the base model's name: what /v1/completions takes as `model` for the base

function errorText(status, data, fallback) {
  const detail = data.error?.message ?? data.detail;
  return `${status}: ${typeof detail === "string" ? detail : JSON.stringify(detail) || fallback}`;
}

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  };
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(errorText(response.status, data, response.statusText));
  return data;
}

// Server-sent events of a streamed completion: onChunk(parsed JSON) for each `data:` line until
// [DONE]; an `error` event is thrown.
async function streamCompletion(body, onChunk) {
  const response = await fetch("/v1/completions", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
  });
  if (!response.ok) {
    const data = await response.json().catch(() => ({}));
    throw new Error(errorText(response.status, data, response.statusText));
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (!event.startsWith("data: ")) continue;
      const payload = event.slice(6);
      if (payload === "[DONE]") return;
      const chunk = JSON.parse(payload);
      if (chunk.error) throw new Error(`${chunk.error.code}: ${chunk.error.message}`);
      onChunk(chunk);
    }
  }
}

function chosenAdapters() {
  return [...document.querySelectorAll("#adapters input:checked")].map((box) => box.value);
}

// At most MAX_ADAPTERS boxes can be ticked: the others are disabled once the limit is reached.
function limitChoices() {
  const full = chosenAdapters().length >= MAX_ADAPTERS;
  for (const box of document.querySelectorAll("#adapters input")) box.disabled = full && !box.checked;
}

async function loadModels() {
  const models = await api("/v1/models");
  baseName = models.base.name;
  $("base-info").textContent = `base: ${models.base.name} on ${models.base.device}`;
  $("no-adapters").hidden = models.adapters.length > 0;
  models.adapters.forEach((adapter, i) => {
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = adapter.name;
    box.checked = i < MAX_ADAPTERS;
    box.addEventListener("change", limitChoices);
    label.append(box, ` ${adapter.name} (${adapter.kind})`);
    $("adapters").append(label);
  });
  limitChoices();
}

function card(title) {
  const section = document.createElement("article");
  section.className = "answer";
  section.dataset.model = title;
  const heading = document.createElement("h2");
  heading.textContent = title;
  const output = document.createElement("div");
  output.className = "output";
  output.textContent = "…";
  const latency = document.createElement("div");
  latency.className = "latency";
  section.append(heading, output, latency);
  $("answers").append(section);
  return { section, output, latency };
}

async function ask(adapter, input, options) {
  const view = card(adapter === null ? "base" : adapter);
  const started = performance.now();
  let first = null;
  let pieces = 0;
  let text = "";
  try {
    let usage = null;
    await streamCompletion({ model: adapter ?? baseName, prompt: input, ...options }, (chunk) => {
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices) {
        if (!choice.text) continue;
        first ??= performance.now() - started;
        pieces += 1;
        text += choice.text;
        view.output.textContent = text;
      }
    });
    view.output.textContent = text;
    view.section.dataset.pieces = String(pieces);
    const ms = Math.round(performance.now() - started);
    view.latency.textContent =
      `${ms} ms · first text after ${Math.round(first ?? ms)} ms · ` +
      `${usage ? usage.completion_tokens : "?"} tokens`;
  } catch (error) {
    view.section.classList.add("error");
    view.output.textContent = error.message;
    view.latency.textContent = `${Math.round(performance.now() - started)} ms`;
  }
  view.section.classList.add("done");
}

async function submit(event) {
  event.preventDefault();
  const input = $("input").value;
  const options = { max_tokens: Number($("max-new-tokens").value), temperature: 0 };
  if ($("do-sample").checked) options.temperature = Number($("temperature").value);
  $("answers").replaceChildren();
  $("submit").disabled = true;
  $("status").textContent = "generating…";
  const started = performance.now();
  await Promise.all([null, ...chosenAdapters()].map((adapter) => ask(adapter, input, options)));
  $("status").textContent = `all answers in ${Math.round(performance.now() - started)} ms`;
  $("submit").disabled = false;
}

$("ask").addEventListener("submit", submit);
loadModels().catch((error) => { $("base-info").textContent = `cannot list models: ${error.message}`; });
