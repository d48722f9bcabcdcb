// The blip2 web page: no framework, no build step. One image at a time: its bytes are sent with every
// request (the server caches the vision tower's output by content, so follow-up questions skip it).
"use strict";

const state = { image: null, previewUrl: null, apiKey: "" };
const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(status, type, message) {
    super(message);
    this.status = status;
    this.type = type;
  }
}

function authHeaders() {
  return state.apiKey ? { Authorization: "Bearer " + state.apiKey } : {};
}

// POST `body` (a FormData or a plain object sent as JSON) to `path`; the answer's JSON, or an ApiError.
async function api(path, body) {
  const headers = authHeaders();
  let payload = body;
  if (!(body instanceof FormData)) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, { method: "POST", headers, body: payload });
  } catch (e) {
    throw new ApiError(0, "network", "");
  }
  let data = null;
  try {
    data = await response.json();
  } catch (e) {
    data = null;
  }
  if (!response.ok) {
    const error = (data && data.error) || {};
    throw new ApiError(response.status, error.type || "unknown", error.message || "");
  }
  return data;
}

// An API error in plain words for the person using the page.
function plainWords(error) {
  if (!(error instanceof ApiError)) return "Something went wrong in this page: " + error.message;
  const detail = error.message ? " (" + error.message + ")" : "";
  switch (error.status) {
    case 0: return "The server cannot be reached. Is `blip2 serve` still running?";
    case 401:
      $("key-panel").hidden = false;
      return "This server needs an API key: enter it in the API key field and try again.";
    case 413: return "That is too large for this server" + detail + ". Try a smaller image or shorter text.";
    case 415: return "The server did not accept the request's format" + detail + ".";
    case 422:
      if (error.type === "invalid_image") return "The server could not read this image" + detail + ".";
      return "The server could not use this request" + detail + ".";
    case 503: return "The server is busy or still loading its models. Try again in a moment.";
    case 504: return "The server took too long to answer. Try again, perhaps with a smaller image.";
    default:
      if (error.status >= 500) return "The server had an internal error; its log has the details.";
      return error.message || "The request failed (HTTP " + error.status + ").";
  }
}

function showError(error) {
  const box = $("error");
  box.textContent = plainWords(error);
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// Runs `work` with `button` disabled; an error is shown to the user, not thrown.
async function busy(button, work) {
  clearError();
  if (button) button.disabled = true;
  try {
    await work();
  } catch (e) {
    showError(e);
    return false;
  } finally {
    if (button) button.disabled = false;
  }
  return true;
}

function needImage() {
  if (state.image) return true;
  showError(new Error("choose an image first."));
  $("file").focus();
  return false;
}

function form(fields) {
  const data = new FormData();
  for (const [name, value] of fields) data.append(name, value);
  return data;
}

// -- the image and its caption ----------------------------------------------------------------------------
async function useImage(file) {
  if (!file || !file.type.startsWith("image/")) {
    showError(new Error("that is not an image."));
    return;
  }
  state.image = file;
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = URL.createObjectURL(file);
  $("preview").src = state.previewUrl;
  $("preview-box").hidden = false;
  $("chat").replaceChildren();
  $("label-results").replaceChildren();
  const caption = $("caption");
  caption.dataset.state = "busy";
  caption.textContent = "captioning…";
  const ok = await busy(null, async () => {
    const answer = await api("/v1/caption", form([["images", file]]));
    if (state.image !== file) return; // another image was chosen meanwhile
    caption.textContent = answer.captions[0];
    caption.dataset.state = "done";
  });
  if (!ok && state.image === file) {
    caption.textContent = "(no caption)";
    caption.dataset.state = "error";
  }
}

function setUpImageInput() {
  $("file").addEventListener("change", (e) => useImage(e.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    useImage(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const item = [...e.clipboardData.items].find((i) => i.kind === "file" && i.type.startsWith("image/"));
    if (item) useImage(item.getAsFile());
  });
}

// -- chat -----------------------------------------------------------------------------------------------------
function addTurn(question) {
  const turn = document.createElement("li");
  const q = document.createElement("p");
  q.textContent = "Q: " + question;
  const a = document.createElement("p");
  a.className = "answer";
  a.textContent = "…";
  turn.append(q, a);
  $("chat").append(turn);
  return a;
}

async function ask(event) {
  event.preventDefault();
  if (!needImage()) return;
  const question = $("question").value.trim();
  if (!question) return;
  const image = state.image;
  const answer = addTurn(question);
  const ok = await busy(event.submitter, async () => {
    const result = await api("/v1/ask", form([["images", image], ["questions", question]]));
    answer.textContent = result.answers[0];
    answer.dataset.state = "done";
  });
  if (ok) $("question").value = "";
  else answer.textContent = "(no answer)";
}

// -- labels ---------------------------------------------------------------------------------------------------
async function scoreLabels(event) {
  event.preventDefault();
  if (!needImage()) return;
  const labels = $("labels").value.split(",").map((l) => l.trim()).filter((l) => l);
  if (!labels.length) return;
  const fields = [["image", state.image], ...labels.map((l) => ["labels", l])];
  const list = $("label-results");
  list.replaceChildren();
  $("labels-note").hidden = true;
  await busy(event.submitter, async () => {
    try {
      const result = await api("/v1/classify", form(fields));
      for (const item of result.labels) {
        const row = document.createElement("li");
        row.dataset.label = item.label;
        row.textContent = item.label + ": " + (100 * item.probability).toFixed(1) + "%";
        list.append(row);
      }
    } catch (e) {
      if (e instanceof ApiError && e.status === 400 && e.type === "unsupported") {
        note("Label scoring needs a matching model: start the server with --match-model.");
        return;
      }
      throw e;
    }
  });
}

function note(text) {
  $("labels-note").textContent = text;
  $("labels-note").hidden = false;
}

// -- search ---------------------------------------------------------------------------------------------------
// The src of a hit's thumbnail: inline data as is; a path on this origin as is, or, when an API key is in
// use (an <img> cannot send it), fetched with the key into a blob: URL. Nothing from another origin.
async function thumbnailSrc(src) {
  if (typeof src !== "string") return null;
  if (src.startsWith("data:image/")) return src;
  if (!src.startsWith("/") || src.startsWith("//")) return null;
  if (!state.apiKey) return src;
  try {
    const response = await fetch(src, { headers: authHeaders() });
    return response.ok ? URL.createObjectURL(await response.blob()) : null;
  } catch (e) {
    return null; // the hit is still listed, without its thumbnail
  }
}

function hitItem(hit, src) {
  const item = document.createElement("li");
  if (src) {
    const img = document.createElement("img");
    img.src = src;
    img.alt = "Result " + hit.rank + ": " + hit.image;
    item.append(img);
  }
  const path = document.createElement("div");
  path.className = "path";
  path.textContent = hit.rank + ". " + hit.image;
  const score = document.createElement("div");
  score.className = "muted";
  score.textContent = "score " + hit.score.toFixed(3);
  item.append(path, score);
  return item;
}

async function search(event) {
  event.preventDefault();
  const text = $("query").value.trim();
  if (!text) return;
  const list = $("hits");
  list.replaceChildren();
  await busy(event.submitter, async () => {
    const result = await api("/v1/search", { text, k: 12 });
    if (!result.hits.length) {
      const none = document.createElement("li");
      none.textContent = "Nothing found.";
      list.append(none);
    }
    const sources = await Promise.all(result.hits.map((hit) => thumbnailSrc(hit.thumbnail)));
    result.hits.forEach((hit, i) => list.append(hitItem(hit, sources[i])));
  });
}

// The search panel appears only where the server has /v1/search with an index: an empty query is refused
// with 422 there, and answered 404 (no such route) or 400 (no index) otherwise.
async function detectSearch() {
  try {
    await api("/v1/search", {});
    $("search-panel").hidden = false;
  } catch (e) {
    $("search-panel").hidden = !(e instanceof ApiError && e.status === 422);
  }
}

// -- start ----------------------------------------------------------------------------------------------------
async function checkReady() {
  const status = $("status");
  for (;;) {
    try {
      const response = await fetch("/readyz");
      if (response.ok) {
        status.textContent = "Ready.";
        return;
      }
      status.textContent = "The server is loading its models…";
    } catch (e) {
      status.textContent = "The server cannot be reached; retrying…";
    }
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

async function start() {
  setUpImageInput();
  $("ask-form").addEventListener("submit", ask);
  $("labels-form").addEventListener("submit", scoreLabels);
  $("search-form").addEventListener("submit", search);
  $("api-key").addEventListener("input", (e) => {
    state.apiKey = e.target.value.trim();
  });
  $("api-key").addEventListener("change", detectSearch);
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    detectSearch();
  });
  try {
    const config = await (await fetch("/web/config")).json();
    $("key-panel").hidden = !config.api_key_required;
  } catch (e) {
    // an older server without /web/config: a 401 shows the key field when needed
  }
  checkReady();
  detectSearch();
}

document.addEventListener("DOMContentLoaded", start);
