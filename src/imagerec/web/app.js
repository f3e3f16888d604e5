"use strict";
// The imagerec page. Each image goes to POST /v1/predict in its own request, so a bad file
// fails only its own result and every answer shows its own time; the server batches them.

const MAX_IN_FLIGHT = 4; // more would only queue in the browser and inflate the times shown
const MODEL_RETRY_MS = 2000;

const $ = (id) => document.getElementById(id);
const percent = new Intl.NumberFormat(undefined, {
  style: "percent",
  minimumFractionDigits: 1,
  maximumFractionDigits: 1,
});

const results = $("results");
const fileInput = $("file-input");
const cameraInput = $("camera-input");
const queue = [];
const objectUrls = [];
const cardUrls = []; // the model card's files, fetched with the key when there is one
let inFlight = 0;
let pasted = 0;
let models = []; // GET /v1/models: every served model, newest version of each
let chosen = null; // the model the next images go to

// An API key, when the server asks for one (401), lives in this tab's session storage only.
const KEY_STORAGE = "imagerec-api-key";

function requestHeaders() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { Accept: "application/json", Authorization: `Bearer ${key}` } : { Accept: "application/json" };
}

function askForKey(message) {
  $("key-form").hidden = false;
  const error = $("key-error");
  error.textContent = message;
  error.hidden = !message;
  $("api-key").focus();
}

function formatBytes(size) {
  if (size >= 1e6) return `${(size / 1e6).toFixed(1)} MB`;
  if (size >= 1e3) return `${Math.round(size / 1e3)} kB`;
  return `${size} bytes`;
}

function formatDuration(ms) {
  return ms >= 1000 ? `${(ms / 1000).toFixed(1)} s` : `${Math.max(1, Math.round(ms))} ms`;
}

// The server's answer decides; this only puts its status and error code into plain words.
function describeError(status, body, name, file) {
  const error = (body && body.error) || {};
  const quoted = `“${name}”`;
  if (status === 0) {
    return "Cannot reach the server. Check that it is running and that you are online, then try again.";
  }
  if (status === 401) {
    askForKey(error.message ? `${error.message}.` : "");
    return `The server needs a valid API key to read ${quoted}. Enter it above, then try again.`;
  }
  if (status === 503) return "The model is still loading. Try again in a few seconds.";
  if (status === 415 || error.code === "unsupported_media_type") {
    const what = file.type === "application/pdf" ? "a PDF document" : "not a picture the model can read";
    return `${quoted} is ${what}. Use a JPEG, PNG, WebP or BMP image.`;
  }
  if (error.code === "too_many_pixels") {
    return `${quoted} has too many pixels for this server. Make it smaller and try again.`;
  }
  if (status === 413) {
    return `${quoted} is too large to send (${formatBytes(file.size)}). Try a smaller picture.`;
  }
  if (error.code === "empty_image") return `${quoted} is empty: the file has no content.`;
  if (error.code === "invalid_image" || error.code === "truncated_image") {
    return `${quoted} looks damaged or incomplete, so it could not be opened.`;
  }
  if (status >= 500) {
    return `Something went wrong on the server while reading ${quoted}. Try again; if it keeps happening, tell whoever runs this service.`;
  }
  if (error.message) return `The server could not use ${quoted}: ${error.message}.`;
  return `The server refused ${quoted} (HTTP ${status}).`;
}

function showPageError(message) {
  const box = $("page-error");
  box.textContent = message;
  box.hidden = !message;
}

function thumbnail(item, file) {
  const box = item.querySelector(".thumb");
  const img = box.querySelector("img");
  const noPreview = () => {
    img.remove();
    box.classList.add("no-preview");
    box.textContent = (file.name.split(".").pop() || "file").slice(0, 4).toUpperCase();
  };
  if (!file.type.startsWith("image/")) return noPreview();
  const url = URL.createObjectURL(file);
  objectUrls.push(url);
  img.addEventListener("error", noPreview, { once: true }); // e.g. HEIC, which browsers cannot show
  img.src = url;
}

function addFiles(files, names = []) {
  const list = Array.from(files);
  if (list.length === 0) return;
  showPageError("");
  $("results-empty").hidden = true;
  $("clear").hidden = false;
  const before = results.firstChild; // newest batch first, each batch in the order given
  for (const [index, file] of list.entries()) {
    const item = $("result-template").content.firstElementChild.cloneNode(true);
    const name = names[index] || file.name || "image";
    item.querySelector(".filename").textContent = name;
    item.setAttribute("aria-busy", "true");
    thumbnail(item, file);
    results.insertBefore(item, before);
    queue.push({ item, file, name });
  }
  pump();
}

function pump() {
  while (inFlight < MAX_IN_FLIGHT && queue.length > 0) {
    inFlight += 1;
    recognise(queue.shift()).finally(() => {
      inFlight -= 1;
      pump();
    });
  }
}

async function recognise({ item, file, name }) {
  const form = new FormData();
  form.append("image", file, name);
  const started = performance.now();
  const query = chosen ? `?${new URLSearchParams({ model: chosen.name })}` : "";
  let response;
  let body = null;
  try {
    response = await fetch(`/v1/predict${query}`, {
      method: "POST",
      body: form,
      headers: requestHeaders(),
    });
    body = await response.json().catch(() => null);
  } catch {
    return finish(item, { error: describeError(0, null, name, file) });
  }
  const elapsed = performance.now() - started;
  const result = body && Array.isArray(body.results) ? body.results[0] : null;
  if (!response.ok || !result) {
    return finish(item, { error: describeError(response.status, body, name, file), elapsed });
  }
  finish(item, { result, elapsed, model: body.model });
}

function finish(item, { result, error, elapsed, model }) {
  const state = item.querySelector(".state");
  if (error) {
    item.classList.add("failed");
    state.textContent = error;
  } else {
    state.textContent = `Most likely: ${result.label}`;
    const scores = item.querySelector(".scores");
    scores.setAttribute("aria-label", "Top labels");
    for (const [index, { label, score }] of result.top_k.entries()) {
      const row = document.createElement("li");
      row.className = index === 0 ? "score top" : "score";
      const name = document.createElement("span");
      name.className = "score-label";
      name.textContent = label;
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.setAttribute("aria-hidden", "true"); // the percentage next to it says the same in words
      const fill = document.createElement("span");
      fill.className = "fill";
      fill.style.width = `${(score * 100).toFixed(1)}%`;
      bar.append(fill);
      const value = document.createElement("span");
      value.className = "score-value";
      value.textContent = percent.format(score);
      row.append(name, bar, value);
      scores.append(row);
    }
  }
  if (elapsed !== undefined) {
    // Name the model and version that answered: a new version can take over between images.
    const by = model ? ` by ${model.name}, version ${model.version}` : "";
    item.querySelector(".timing").textContent = `answered${by} in ${formatDuration(elapsed)}`;
  }
  item.removeAttribute("aria-busy");
}

function clearResults() {
  results.replaceChildren();
  objectUrls.splice(0).forEach((url) => URL.revokeObjectURL(url));
  $("results-empty").hidden = false;
  $("clear").hidden = true;
  showPageError("");
  $("drop").focus();
}

async function loadModel() {
  const status = $("model-status");
  let response;
  let body = null;
  try {
    response = await fetch("/v1/models", { headers: requestHeaders() });
    body = await response.json().catch(() => null);
  } catch {
    status.textContent = "Cannot reach the server. This page will try again.";
    setTimeout(loadModel, MODEL_RETRY_MS * 2);
    return;
  }
  if (response.status === 401) {
    status.textContent = "This server needs an API key before it describes its model.";
    const known = sessionStorage.getItem(KEY_STORAGE);
    askForKey(known ? "That key was not accepted. Check it and try again." : "");
    return;
  }
  $("key-error").hidden = true;
  if (response.status === 503) {
    status.textContent = "The model is still loading. This page updates when it is ready.";
    setTimeout(loadModel, MODEL_RETRY_MS);
    return;
  }
  if (!response.ok || !body || !Array.isArray(body.models) || body.models.length === 0) {
    status.textContent = `The server could not describe its models (HTTP ${response.status}).`;
    return;
  }
  models = body.models;
  const picker = $("model-picker");
  picker.replaceChildren(
    ...models.map(({ name }) => {
      const option = document.createElement("option");
      option.value = name;
      option.textContent = name;
      return option;
    }),
  );
  picker.value = body.default || models[0].name;
  $("model-choice").hidden = models.length < 2;
  showModel(picker.value);
}

function describeAccuracy(accuracy) {
  if (!accuracy) return ["Accuracy", "not recorded", ""];
  const value = percent.format(accuracy.value);
  if (accuracy.kind === "estimate") {
    // Trained on every image: the figure is that of its recipe, measured with images held out.
    const spread = typeof accuracy.std === "number" ? ` ± ${percent.format(accuracy.std)}` : "";
    const runs = accuracy.runs ? `mean of ${accuracy.runs} training runs` : "its recipe";
    return ["Expected accuracy", value, `(estimate${spread}: ${runs} with images held out)`];
  }
  return ["Validation accuracy", value, "(on held-out images)"];
}

function showModel(name) {
  chosen = models.find((model) => model.name === name) || models[0];
  const labels = chosen.labels || [];
  const [kind, value, source] = describeAccuracy(chosen.accuracy);
  $("model-name").textContent = chosen.name;
  $("model-version").textContent = chosen.version;
  $("model-accuracy-kind").textContent = kind;
  $("model-accuracy").textContent = value;
  $("model-accuracy-source").textContent = source;
  const shown = labels.slice(0, 40).join(", ");
  $("model-labels").textContent =
    labels.length > 40 ? `${shown} and ${labels.length - 40} more` : shown;
  $("model-facts").hidden = false;
  $("model-status").textContent = `Ready: ${labels.length} kinds of things.`;
  loadCard(chosen);
}

async function loadCard(model) {
  $("model-card").hidden = true;
  try {
    const query = new URLSearchParams({ model: model.name, version: model.version });
    const response = await fetch(`/v1/model/card?${query}`, { headers: requestHeaders() });
    if (!response.ok || chosen !== model) return;
    // People want the pictures and the metrics; labels and preprocessing are in the header.
    const files = (await response.json()).files.filter(
      (file) => file.content_type.startsWith("image/") || file.name === "metrics.json",
    );
    const links = $("model-card-links");
    const keyed = Boolean(sessionStorage.getItem(KEY_STORAGE));
    cardUrls.splice(0).forEach((url) => URL.revokeObjectURL(url));
    links.replaceChildren(
      ...(await Promise.all(
        files.map(async ({ title, url }) => {
          const item = document.createElement("li");
          const link = document.createElement("a");
          // A link the browser follows carries no key: with one, the file comes through fetch.
          link.href = keyed ? await keyedObjectUrl(url) : url;
          link.textContent = title;
          item.append(link);
          return item;
        }),
      )),
    );
    $("model-card").hidden = files.length === 0;
  } catch {
    // The card is extra; the page works without it.
  }
}

async function keyedObjectUrl(url) {
  const response = await fetch(url, { headers: requestHeaders() });
  const objectUrl = URL.createObjectURL(await response.blob());
  cardUrls.push(objectUrl);
  return objectUrl;
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) return askForKey("Enter the key first.");
  sessionStorage.setItem(KEY_STORAGE, key);
  $("api-key").value = "";
  loadModel();
});
$("forget-key").addEventListener("click", () => {
  sessionStorage.removeItem(KEY_STORAGE);
  askForKey("The key is forgotten: this tab no longer sends it.");
});
$("model-picker").addEventListener("change", (event) => showModel(event.target.value));
$("drop").addEventListener("click", () => fileInput.click());
$("camera-button").addEventListener("click", () => cameraInput.click());
$("clear").addEventListener("click", clearResults);
for (const input of [fileInput, cameraInput]) {
  input.addEventListener("change", () => {
    addFiles(input.files);
    input.value = ""; // so picking the same file again still counts as a change
  });
}

// Drops anywhere on the page count, so a near miss does not open the image in the tab.
let dragDepth = 0;
document.addEventListener("dragenter", (event) => {
  if (!event.dataTransfer || !event.dataTransfer.types.includes("Files")) return;
  dragDepth += 1;
  document.body.classList.add("dragging");
});
document.addEventListener("dragleave", () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (dragDepth === 0) document.body.classList.remove("dragging");
});
document.addEventListener("dragover", (event) => event.preventDefault());
document.addEventListener("drop", (event) => {
  event.preventDefault();
  dragDepth = 0;
  document.body.classList.remove("dragging");
  addFiles(event.dataTransfer ? event.dataTransfer.files : []);
});

document.addEventListener("paste", (event) => {
  const files = Array.from(event.clipboardData ? event.clipboardData.files : []);
  if (files.length === 0) {
    showPageError("The clipboard holds no image. Copy a picture first, then paste it here.");
    return;
  }
  event.preventDefault();
  addFiles(files, files.map(() => `Pasted image ${(pasted += 1)}`));
});

loadModel();
