// The twostage page: plain JS against the JSON API, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
let metadata = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value;
  if (key) h["X-API-Key"] = key;
  return h;
}

async function call(method, path, body) {
  const response = await fetch(path, {
    method, headers: headers(), body: body ? JSON.stringify(body) : undefined,
  });
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

function clearResults() {
  // An error must not leave the previous user's lists on screen.
  for (const id of ["recs", "retrieval", "history"]) $(id).replaceChildren();
  for (const id of ["path", "history-count"]) $(id).textContent = "";
}

function name(item) {
  return item.label || `item ${item.item_id}`;
}

// One list entry: the title (with its year when the title has one), tags (genres),
// the score and the predicted rating, and why it is there.
function entry(item, scoreName) {
  const li = document.createElement("li");
  li.dataset.itemId = String(item.item_id);
  li.append(document.createTextNode(name(item)));
  const meta = [];
  if (item.tags && item.tags.length) meta.push(item.tags.join(", "));
  if (scoreName && item.rank_score != null) meta.push(`${scoreName} ${item.rank_score.toFixed(3)}`);
  else if (scoreName && item.score != null) meta.push(`${scoreName} ${item.score.toFixed(3)}`);
  if (item.predicted_rating != null) meta.push(`predicted rating ${item.predicted_rating.toFixed(1)}`);
  if (meta.length) {
    const span = document.createElement("span");
    span.className = "meta";
    span.textContent = meta.join(" · ");
    li.append(span);
  }
  if (item.because) {
    const why = document.createElement("span");
    why.className = "because";
    why.textContent = `because you watched ${item.because.label || "item " + item.because.item_id}`;
    li.append(why);
  }
  li.addEventListener("click", () => similar(item));
  return li;
}

function fill(list, items, scoreName) {
  list.replaceChildren(...items.map((item) => entry(item, scoreName)));
}

// Text typed as an ID: a number when it is one written plainly and exactly ("42"),
// else the text itself, so "0829433244" (an ISBN) keeps its leading zero and a
// 20-digit ID its last digits.
function typedId(raw) {
  if (!/^-?(0|[1-9]\d*)$/.test(raw)) return raw;
  const number = Number(raw);
  return Number.isSafeInteger(number) ? number : raw;
}

function userId() {
  const raw = $("user").value.trim();
  if (!raw) return null;
  return typedId(raw);
}

// The session box: item IDs of this visit, oldest first ("50, 172"), with the
// user's rating of each from the ratings box and when each was taken from the
// times box, when the model reads them ("5, 2"; "1700000000, 1700000120"; an
// empty entry: not known). A value that is not a number is sent as written, so
// the server names it.
function session() {
  if ($("session").disabled) return null;  // the model reads no history
  const ids = $("session").value.split(",").map((s) => s.trim()).filter(Boolean);
  if (!ids.length) return null;
  const listed = (box, input) => ($(box).hidden ? [] : $(input).value.split(",").map((s) => s.trim()));
  const rated = listed("ratings-box", "ratings");
  const timed = listed("times-box", "times");
  const number = (raw) => (/^-?\d+(\.\d+)?$/.test(raw) ? Number(raw) : raw);
  return ids.map((id, n) => {
    const rating = rated[n] || "";
    const time = timed[n] || "";
    if (!rating && !time) return typedId(id);
    const entry = {item_id: typedId(id)};
    if (rating) entry.rating = number(rating);
    if (time) entry.timestamp = number(time);
    return entry;
  });
}

// The "not" box: item IDs to leave out of the list ("50, 172").
function excluded() {
  const ids = $("exclude").value.split(",").map((s) => s.trim()).filter(Boolean);
  return ids.length ? ids.map(typedId) : null;
}

function userFeatures() {
  const values = {};
  for (const input of $("features").querySelectorAll("input")) {
    const raw = input.value.trim();
    // "02139" (a zip code) stays text; "30" and "1.5" are numbers.
    if (raw) values[input.name] = /^-?(0|[1-9]\d*)(\.\d+)?$/.test(raw) ? Number(raw) : raw;
  }
  return Object.keys(values).length ? values : null;
}

// The moment of the request, for a model that reads per-interaction context: a
// UTC date and time for the columns the timestamp gives (hour, weekday), a box
// for each other column.
const FROM_TIME = new Set(["timestamp", "hour_of_day", "day_of_week"]);

function context() {
  if ($("context").hidden) return null;
  const values = {};
  for (const input of $("context").querySelectorAll("input")) {
    const raw = input.value.trim();
    if (!raw) continue;
    if (input.type === "datetime-local") {
      values.timestamp = Math.floor(Date.parse(raw + "Z") / 1000);  // read as UTC
    } else {
      values[input.name] = /^-?(0|[1-9]\d*)(\.\d+)?$/.test(raw) ? Number(raw) : raw;
    }
  }
  return Object.keys(values).length ? values : null;
}

function contextInputs(fields) {
  const inputs = [];
  if (fields.some((f) => FROM_TIME.has(f.column))) {
    const wrap = document.createElement("label");
    wrap.textContent = "When (UTC) ";
    const input = document.createElement("input");
    input.type = "datetime-local";
    input.name = "timestamp";
    wrap.append(input);
    inputs.push(wrap);
  }
  for (const field of fields.filter((f) => !FROM_TIME.has(f.column))) {
    const wrap = document.createElement("label");
    wrap.textContent = `${field.column} `;
    const input = document.createElement("input");
    input.name = field.column;
    input.placeholder = field.kind;
    input.size = 8;
    wrap.append(input);
    inputs.push(wrap);
  }
  return inputs;
}

function maxPer() {
  const limit = Number($("max-per").value);
  if (!limit || !metadata || !metadata.tags_column) return null;
  return { [metadata.tags_column]: limit };
}

function filters() {
  const tag = $("filter").value.trim();
  if (!tag || !metadata || !metadata.tags_column) return null;
  return { [metadata.tags_column]: tag };
}

async function recommend(event) {
  if (event) event.preventDefault();
  showError("");
  const body = {
    model: $("model").value || null,
    user_id: userId(),
    user_features: userFeatures(),
    k: Number($("k").value) || 10,
    exclude_seen: $("exclude-seen").checked,
    diversity: Number($("diversity").value) || 0,
    diversity_by: $("diversity-by-tags").checked && metadata && metadata.tags_column
      ? metadata.tags_column : null,
    max_per: maxPer(),
    num_candidates: Number($("pool").value) || null,
    filters: filters(),
    session: session(),
    exclude: excluded(),
    context: context(),
    include_history: true,
    explain: true,
  };
  try {
    const both = metadata && metadata.has_ranker;
    const [answer, plain] = await Promise.all([
      call("POST", "/v1/recommend", body),
      both ? call("POST", "/v1/recommend", { ...body, use_ranker: false, include_history: false })
           : Promise.resolve(null),
    ]);
    const unread = answer.unread_session_items || [];
    const unknown = answer.unknown_excluded_items || [];
    $("path").textContent = `(${answer.path.replaceAll("_", " ")}, version ${answer.version}` +
      (unread.length ? `; session items added after training, not read: ${unread.join(", ")}` : "") +
      (unknown.length ? `; not in the catalogue, nothing to leave out: ${unknown.join(", ")}` : "") +
      (answer.short_reason === "max_per" ? "; short: the tag limit passed over the rest" : "") + ")";
    fill($("recs"), answer.items, both ? "two-stage score" : "score");
    $("retrieval-column").hidden = !plain;
    if (plain) fill($("retrieval"), plain.items, "retrieval score");
    const history = (answer.history || []).slice().reverse();  // latest first
    fill($("history"), history, null);
    $("history-count").textContent = history.length ? `(${history.length} items, latest first)` : "(none)";
  } catch (error) {
    clearResults();
    showError(error.message);
  }
}

async function similar(item) {
  showError("");
  try {
    const answer = await call("POST", "/v1/similar", {
      model: $("model").value || null, item_id: item.item_id, k: 10,
    });
    $("similar-to").textContent = `(to ${name(item)})`;
    fill($("similar"), answer.items, "similarity");
  } catch (error) {
    $("similar").replaceChildren();
    showError(error.message);
  }
}

let searchTimer = null;
function search() {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(async () => {
    const text = $("search").value.trim();
    if (!text) { $("found").replaceChildren(); return; }
    try {
      const path = `/v1/models/${encodeURIComponent($("model").value)}/items?` +
        new URLSearchParams({ q: text, limit: "8" });
      const answer = await call("GET", path);
      fill($("found"), answer.items, null);
    } catch (error) {
      $("found").replaceChildren();
      showError(error.message);
    }
  }, 150);
}

async function loadModel() {
  showError("");
  try {
    metadata = await call("GET", `/v1/models/${encodeURIComponent($("model").value)}/metadata`);
  } catch (error) {
    showError(error.message);
    return;
  }
  $("model-info").textContent =
    `version ${metadata.version} · ${metadata.num_users} users · ${metadata.num_items} items` +
    ` · ${metadata.query_encoders.join(" + ")} query` +
    (metadata.has_ranker ? " · with ranking stage" : "");
  $("filter").disabled = !metadata.tags_column;
  $("session").disabled = metadata.history_length === 0;  // nothing would read it
  $("ratings-box").hidden = !metadata.reads_session_ratings;
  const range = metadata.session_rating_range, rated = $("ratings");
  rated.dataset.title ??= rated.title;  // the page's own, before any model's range
  rated.title = rated.dataset.title + (range ? ` From ${range[0]} to ${range[1]}.` : "");
  $("times-box").hidden = !metadata.reads_session_times;
  $("users").replaceChildren(...metadata.sample_users.map((id) => {
    const option = document.createElement("option");
    option.value = String(id);
    return option;
  }));
  if (!$("user").value && metadata.sample_users.length) $("user").value = String(metadata.sample_users[0]);
  const fields = metadata.context || [];
  $("context").replaceChildren(...contextInputs(fields));
  $("context").hidden = !fields.length;  // the model reads no context
  $("features").replaceChildren(...metadata.user_features.map((feature) => {
    const wrap = document.createElement("label");
    wrap.textContent = `${feature.column} `;
    const input = document.createElement("input");
    input.name = feature.column;
    input.placeholder = feature.kind;
    wrap.append(input);
    return wrap;
  }));
  await recommend();  // useful from the first paint: a sample user's answer
}

async function loadModels() {
  try {
    const { models } = await call("GET", "/v1/models");
    $("model").replaceChildren(...models.map((m) => {
      const option = document.createElement("option");
      option.value = m.name;
      option.textContent = m.name;
      return option;
    }));
    if (models.length) await loadModel();
  } catch (error) {
    showError(error.message);
  }
}

function start() {
  $("api-key").value = localStorage.getItem("twostage-api-key") || "";
  $("api-key").addEventListener("change", () => {
    localStorage.setItem("twostage-api-key", $("api-key").value);
    loadModels();
  });
  $("query").addEventListener("submit", recommend);
  $("diversity").addEventListener("input", () => {
    $("diversity-value").textContent = $("diversity").value;
  });
  $("diversity").addEventListener("change", () => recommend());
  $("diversity-by-tags").addEventListener("change", () => recommend());
  $("search-form").addEventListener("submit", (event) => event.preventDefault());
  $("search").addEventListener("input", search);
  $("model").addEventListener("change", loadModel);
  loadModels();
}

start();
