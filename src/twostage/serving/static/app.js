// The twostage demo page: plain JS against the JSON API, no build step.
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

function label(item) {
  const name = item.label || String(item.item_id);
  return item.tags && item.tags.length ? `${name} (${item.tags.join(", ")})` : name;
}

function fill(list, items, withScores) {
  list.replaceChildren();
  for (const item of items) {
    const li = document.createElement("li");
    li.dataset.itemId = String(item.item_id);
    li.textContent = label(item);
    if (withScores) {
      const score = document.createElement("span");
      score.className = "score";
      const parts = [`score ${item.score.toFixed(3)}`];
      if (item.rank_score != null) parts.push(`rank ${item.rank_score.toFixed(3)}`);
      if (item.predicted_rating != null) parts.push(`rating ${item.predicted_rating.toFixed(2)}`);
      score.textContent = parts.join(" · ");
      li.append(score);
    }
    li.addEventListener("click", () => similar(item));
    list.append(li);
  }
}

function userId() {
  const raw = $("user").value.trim();
  if (!raw) return null;
  return /^-?\d+$/.test(raw) ? Number(raw) : raw;
}

function userFeatures() {
  const values = {};
  for (const input of $("features").querySelectorAll("input")) {
    const raw = input.value.trim();
    if (raw) values[input.name] = /^-?\d+(\.\d+)?$/.test(raw) ? Number(raw) : raw;
  }
  return Object.keys(values).length ? values : null;
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
    include_history: true,
  };
  try {
    const answer = await call("POST", "/v1/recommend", body);
    $("path").textContent = `(${answer.path.replaceAll("_", " ")}, version ${answer.version})`;
    fill($("recs"), answer.items, true);
    const history = (answer.history || []).slice().reverse();  // latest first
    fill($("history"), history, false);
    $("history-count").textContent = `(${history.length} items, latest first)`;
  } catch (error) {
    showError(error.message);
  }
}

async function similar(item) {
  showError("");
  try {
    const answer = await call("POST", "/v1/similar", {
      model: $("model").value || null, item_id: item.item_id, k: 10,
    });
    $("similar-to").textContent = `(to ${label(item)})`;
    fill($("similar"), answer.items, true);
  } catch (error) {
    showError(error.message);
  }
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
    (metadata.has_ranker ? " · with ranking stage" : "");
  $("users").replaceChildren(...metadata.sample_users.map((id) => {
    const option = document.createElement("option");
    option.value = String(id);
    return option;
  }));
  if (!$("user").value && metadata.sample_users.length) $("user").value = String(metadata.sample_users[0]);
  $("features").replaceChildren(...metadata.user_features.map((feature) => {
    const wrap = document.createElement("label");
    wrap.textContent = `${feature.column} `;
    const input = document.createElement("input");
    input.name = feature.column;
    input.placeholder = feature.kind;
    wrap.append(input);
    return wrap;
  }));
}

function start() {
  $("api-key").value = localStorage.getItem("twostage-api-key") || "";
  $("api-key").addEventListener("change", () => {
    localStorage.setItem("twostage-api-key", $("api-key").value);
    loadModels();
  });
  $("query").addEventListener("submit", recommend);
  $("model").addEventListener("change", loadModel);
  loadModels();
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

start();
