// The captioning page: pick, drop or paste a photo; it is posted to /v1/captions with the chosen options.
// The controls start at the model's recorded decoding options (from /readyz), and only the ones the user changes
// are sent: like every other door, a parameter not given is the model's own default.
"use strict";

const $ = (id) => document.getElementById(id);
const SHOWN_CAPTIONS = 3; // how many of the beams to list unless the user says otherwise (changes no caption)
let currentFile = null;
let pending = null;
const touched = new Set(); // names of the controls the user changed

function showModelOptions(model) {
  if (!touched.has("strategy")) $(`strategy-${model.strategy}`).checked = true;
  if (!touched.has("beam_size")) $("beam-size").value = String(model.beam_size);
  if (!touched.has("max_length")) $("max-length").value = String(model.max_length);
  const width = model.strategy === "beam" ? model.beam_size : 1;
  if (!touched.has("num_captions")) $("num-captions").value = String(Math.min(SHOWN_CAPTIONS, width));
}

const modelReady = fetch("/readyz").then((r) => r.json()).then((data) => {
  $("model").textContent = data.model ? `Model: ${data.model.name} ${data.model.version}.` : "The model is loading…";
  if (data.options) showModelOptions(data.options);
  options();
}).catch(() => {});

function options() {
  const strategy = document.querySelector('input[name="strategy"]:checked').value;
  const beamSize = Math.min(10, Math.max(1, parseInt($("beam-size").value, 10) || 3));
  const maxCaptions = strategy === "beam" ? beamSize : 1;
  $("num-captions").max = String(maxCaptions);
  $("beam-size").disabled = strategy !== "beam";
  $("num-captions").disabled = strategy !== "beam";
  const numCaptions = Math.min(maxCaptions, Math.max(1, parseInt($("num-captions").value, 10) || 1));
  const maxLength = Math.min(50, Math.max(1, parseInt($("max-length").value, 10) || 20));
  const params = {};
  if (touched.has("strategy")) params.strategy = strategy;
  if (touched.has("max_length")) params.max_length = maxLength;
  if (strategy === "beam") {
    if (touched.has("beam_size")) params.beam_size = beamSize;
    params.num_captions = numCaptions;
  }
  return { strategy, params };
}

function show(file) {
  if (!file) return;
  currentFile = file;
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.alt = file.name || "uploaded photo";
  preview.hidden = false;
  $("drop-hint").innerHTML = "<strong>Choose another photo</strong> or drop it here";
  caption();
}

// Captions are ranked by their score (the length-normalised log-probability beams are ranked by): higher is better.
// The summed log_prob favours short captions, so it is shown only where a server sends no score.
function bestFirst(captions) {
  if (!captions.every((c) => typeof c.score === "number")) return captions;  // the server's order is best first
  return [...captions].sort((a, b) => b.score - a.score);
}

function probabilityText(p) {
  if (typeof p !== "number") return "";
  return p.toPrecision(2);  // 0.011, 0.00075, 3.1e-7: two significant digits at any size
}

function captionItem(item) {
  const li = document.createElement("li");
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = item.text;
  const numbers = document.createElement("span");
  numbers.className = "prob";
  const probability = typeof item.probability === "number" ? item.probability : Math.exp(item.log_prob);
  if (typeof item.score === "number") {
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = `score ${item.score.toFixed(2)}`;
    score.title = "ranking score: log-probability per word (length-normalised); the captions are listed by it";
    numbers.append(score, ` · p = ${probabilityText(probability)}`);
  } else {
    numbers.textContent = `log p = ${item.log_prob.toFixed(2)} · p = ${probabilityText(probability)}`;
  }
  li.append(text, numbers);
  return li;
}

// The encoder's top ImageNet classes, as chips ("espresso 94%"); hidden when the model has no tags.
function showTags(tags) {
  const list = $("tags");
  list.replaceChildren(...tags.map((tag) => {
    const li = document.createElement("li");
    const prob = document.createElement("span");
    prob.className = "prob";
    prob.textContent = `${Math.round(tag.probability * 100)}%`;
    li.append(tag.label, prob);
    li.title = `ImageNet class "${tag.label}", probability ${tag.probability.toFixed(3)}`;
    return li;
  }));
  list.hidden = tags.length === 0;
}

function setStatus(text) { $("status").textContent = text; }

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function caption() {
  if (!currentFile) return;
  await modelReady;
  const { strategy, params } = options();
  const body = new FormData();
  body.append("image", currentFile, currentFile.name || "photo");
  const query = new URLSearchParams(params).toString();
  if (pending) pending.abort();
  const controller = new AbortController();
  pending = controller;
  setStatus(`Captioning with ${strategy === "beam" ? "beam search" : "greedy decoding"}…`);
  showError("");
  $("captions").replaceChildren();
  showTags([]);
  $("timing").textContent = "";
  try {
    const headers = {};
    const key = $("api-key").value.trim();
    if (key) headers.Authorization = `Bearer ${key}`;
    const response = await fetch(`/v1/captions?${query}`, { method: "POST", body, headers, signal: controller.signal });
    const data = await response.json();
    if (response.status === 401) $("api-key-field").hidden = false;  // this server wants an API key: ask for it
    if (!response.ok) {
      setStatus(`Error ${response.status}`);
      showError(data.error ? `${data.error.message} (${data.error.code})` : response.statusText);
      return;
    }
    for (const item of bestFirst(data.captions)) $("captions").append(captionItem(item));
    showTags(data.tags || []);
    const image = data.image || {};
    const used = data.options; // the options actually used: the model's defaults and what was sent
    setStatus(`${image.format || "image"} ${image.width}×${image.height}, ` +
      `${used.strategy}${used.strategy === "beam" ? ` (beam size ${used.beam_size})` : ""}`);
    $("timing").textContent = `${data.model.name} ${data.model.version} · ${data.timing_ms.total.toFixed(0)} ms`;
  } catch (err) {
    if (err.name === "AbortError") return;
    setStatus("Request failed");
    showError(String(err));
  } finally {
    if (pending === controller) pending = null;
  }
}

function init() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => show(event.target.files[0]));
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (event) => show(event.dataTransfer.files[0]));
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); $("file").click(); }
  });
  document.addEventListener("paste", (event) => {
    const file = [...event.clipboardData.files].find((f) => f.type.startsWith("image/"));
    if (file) show(file);
  });
  $("options").addEventListener("change", (event) => {
    if (event.target.name) touched.add(event.target.name);
    options();
    caption();
  });
  $("options").addEventListener("submit", (event) => event.preventDefault());
  options();
}

init();
