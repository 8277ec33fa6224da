// The playground: the base model and up to three adapters answer one input side by side.
// Plain DOM and fetch, no build step; model text is only ever set as textContent.
"use strict";

const MAX_ADAPTERS = 3;
const $ = (id) => document.getElementById(id);

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  };
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail);
    throw new Error(`${response.status}: ${detail || response.statusText}`);
  }
  return data;
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
  try {
    const answer = await api("/v1/generate", { adapter, inputs: [input], ...options });
    const ms = Math.round(performance.now() - started);
    view.output.textContent = answer.outputs[0];
    view.latency.textContent =
      `${ms} ms · generation ${Math.round(answer.timing.generate_ms)} ms · ` +
      `${answer.output_tokens[0]} tokens · batch of ${answer.batch.requests}`;
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
  const options = { max_new_tokens: Number($("max-new-tokens").value) };
  if ($("do-sample").checked) {
    options.do_sample = true;
    options.temperature = Number($("temperature").value);
  }
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
