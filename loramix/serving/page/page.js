// The loramix page: a chat over /v1/chat/completions (streamed), every token coloured by its
// dominant expert, a tooltip with all its weights, and a heatmap (experts x adapted modules) of
// the last answer. Plain browser JavaScript: no build step, nothing fetched from elsewhere.
"use strict";

const PALETTE = ["#d62728", "#2ca02c", "#1f77b4", "#ff7f0e", "#9467bd", "#17becf", "#e377c2",
                 "#8c564b", "#bcbd22", "#7f7f7f"];
const state = { model: null, experts: [], modules: [], history: [], busy: false };
const $ = (id) => document.getElementById(id);

function colour(expert) { return PALETTE[expert % PALETTE.length]; }

function tint(hex, alpha) {
  const n = parseInt(hex.slice(1), 16);
  return `rgba(${n >> 16}, ${(n >> 8) & 255}, ${n & 255}, ${alpha.toFixed(3)})`;
}

function argmax(values) {
  let best = 0;
  values.forEach((v, i) => { if (v > values[best]) best = i; });
  return best;
}

async function loadModel() {
  const response = await fetch("/v1/models");
  const card = (await response.json()).data[0];
  state.model = card.id;
  state.experts = card.experts;
  state.modules = card.adapted_modules;
  $("model-id").textContent = `${card.id} \u00b7 ${card.experts.length} experts \u00b7 ` +
    `${card.adapted_modules.length} adapted modules`;
  const mode = document.querySelector(`input[name=mode][value=${card.scalings_mode}]`);
  if (mode) mode.checked = true;
  const legend = $("legend");
  const sliders = $("sliders");
  state.experts.forEach((name, i) => {
    const item = document.createElement("span");
    item.className = "legend-item";
    item.dataset.expert = String(i);
    item.innerHTML = `<span class="swatch" style="background:${colour(i)}"></span>`;
    item.append(name);
    legend.append(item);
    const label = document.createElement("label");
    label.innerHTML = `<span class="swatch" style="background:${colour(i)}"></span>`;
    label.append(name);
    const slider = document.createElement("input");
    Object.assign(slider, { type: "range", min: "0", max: "1", step: "0.05",
                            value: i === 0 ? "1" : "0" });
    slider.dataset.expert = name;
    const out = document.createElement("output");
    out.textContent = slider.value;
    slider.addEventListener("input", () => {
      out.textContent = slider.value;
      document.querySelector("input[name=mode][value=fixed]").checked = true;
      updateSliders();
    });
    label.append(slider, out);
    sliders.append(label);
  });
  updateSliders();
}

function updateSliders() {
  $("sliders").classList.toggle("off", selectedMode() !== "fixed");
}

function selectedMode() { return document.querySelector("input[name=mode]:checked").value; }

function addMessage(role, text) {
  const box = document.createElement("div");
  box.className = `msg ${role}`;
  box.innerHTML = `<span class="who">${role}</span>`;
  const body = document.createElement("span");
  body.className = "body";
  body.textContent = text;
  box.append(body);
  $("chat").append(box);
  return body;
}

function addToken(body, text, weights) {
  const span = document.createElement("span");
  const top = argmax(weights);
  span.className = "tok";
  span.textContent = text;
  span.dataset.expert = String(top);
  span.dataset.weights = JSON.stringify(weights);
  span.style.background = tint(colour(top), 0.18 + 0.5 * weights[top]);
  body.append(span);
}

function showTip(event, rows) {
  const tip = $("tip");
  tip.innerHTML = "<table>" + rows.map(([name, value, i]) =>
    `<tr><td><span class="swatch" style="background:${colour(i)}"></span></td><td>${name}</td>` +
    `<td>${value.toFixed(3)}</td><td><span class="bar" style="width:${Math.round(60 * value)}px;` +
    `background:${colour(i)}"></span></td></tr>`).join("") + "</table>";
  tip.hidden = false;
  tip.style.left = `${Math.min(event.clientX + 12, window.innerWidth - 220)}px`;
  tip.style.top = `${event.clientY + 14}px`;
}

function hideTip() { $("tip").hidden = true; }

function onTokenHover(event) {
  const span = event.target.closest(".tok");
  if (!span) { hideTip(); return; }
  const weights = JSON.parse(span.dataset.weights);
  showTip(event, weights.map((w, i) => [state.experts[i], w, i]));
}

function useChat() { return $("use-chat").checked; }

function requestBody(prompt) {
  // With the chat template: the whole conversation; without: the prompt alone, as plain text
  // (models trained on plain prompts, like the bundled science model, answer best that way).
  const body = {
    model: state.model,
    stream: true,
    max_tokens: Number($("max-tokens").value) || 96,
    temperature: Number($("temperature").value) || 0,
    return_expert_weights: true,
    return_layer_scalings: true,
  };
  if (useChat()) body.messages = state.history; else body.prompt = prompt;
  const mode = selectedMode();
  if (mode === "fixed") {
    body.fixed_expert_weights = {};
    document.querySelectorAll("#sliders input").forEach((s) => {
      body.fixed_expert_weights[s.dataset.expert] = Number(s.value);
    });
  } else {
    body.scalings_mode = mode;
  }
  return body;
}

async function ask(prompt) {
  state.busy = true;
  $("send").disabled = true;
  $("status").textContent = "";
  addMessage("user", prompt);
  state.history.push({ role: "user", content: prompt });
  const body = addMessage("assistant", "");
  body.parentElement.dataset.mode = selectedMode();
  let answer = "";
  try {
    const route = useChat() ? "/v1/chat/completions" : "/v1/completions";
    const response = await fetch(route, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(requestBody(prompt)),
    });
    if (!response.ok) {
      const error = await response.json();
      throw new Error(error.error ? error.error.message : response.statusText);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const chunk = JSON.parse(line.slice(6));
        if (chunk.error) throw new Error(chunk.error.message);
        for (const choice of chunk.choices) {
          (choice.expert_tokens || []).forEach((text, i) => {
            addToken(body, text, choice.expert_weights[i]);
            answer += text;
          });
          if (choice.layer_scalings) drawHeatmap(choice.layer_scalings);
        }
      }
    }
    state.history.push({ role: "assistant", content: answer });
  } catch (error) {
    $("status").textContent = `Error: ${error.message}`;
    state.history.pop();
  } finally {
    state.busy = false;
    $("send").disabled = false;
  }
}

function drawHeatmap(layers) {
  // layers: L rows (adapted modules) of E values; drawn as E rows x L columns.
  const canvas = $("heatmap");
  const experts = state.experts.length;
  const label = 110;
  const rowHeight = Math.max(18, Math.floor(140 / experts));
  canvas.width = canvas.clientWidth || 960;
  canvas.height = rowHeight * experts + 24;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const cell = (canvas.width - label) / layers.length;
  let peak = 0;
  layers.forEach((row) => row.forEach((v) => { peak = Math.max(peak, v); }));
  ctx.font = "12px system-ui, sans-serif";
  ctx.textBaseline = "middle";
  state.experts.forEach((name, e) => {
    ctx.fillStyle = colour(e);
    ctx.fillText(name, 4, e * rowHeight + rowHeight / 2);
    layers.forEach((row, l) => {
      ctx.fillStyle = tint(colour(e), peak > 0 ? row[e] / peak : 0);
      ctx.fillRect(label + l * cell, e * rowHeight, Math.ceil(cell), rowHeight - 1);
    });
  });
  ctx.fillStyle = "#666";
  ctx.fillText(`adapted modules 1..${layers.length} (colour: weight, darkest = ${peak.toFixed(2)})`,
               label, experts * rowHeight + 12);
  canvas.dataset.drawn = String(layers.length);
  canvas.onmousemove = (event) => {
    const box = canvas.getBoundingClientRect();
    const x = (event.clientX - box.left) * canvas.width / box.width - label;
    const y = (event.clientY - box.top) * canvas.height / box.height;
    const l = Math.floor(x / cell);
    if (x < 0 || l >= layers.length || y > experts * rowHeight) { hideTip(); return; }
    showTip(event, state.experts.map((name, e) => [name, layers[l][e], e]));
    $("tip").insertAdjacentHTML("afterbegin", `<div>${state.modules[l] || l}</div>`);
  };
  canvas.onmouseleave = hideTip;
}

document.addEventListener("DOMContentLoaded", async () => {
  await loadModel();
  $("chat").addEventListener("mousemove", onTokenHover);
  $("chat").addEventListener("mouseleave", hideTip);
  document.querySelectorAll("input[name=mode]").forEach((r) => r.addEventListener("change", updateSliders));
  $("ask").addEventListener("submit", (event) => {
    event.preventDefault();
    const prompt = $("prompt").value.trim();
    if (!prompt || state.busy) return;
    $("prompt").value = "";
    ask(prompt);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("ask").requestSubmit();
    }
  });
  $("clear").addEventListener("click", () => {
    state.history = [];
    $("chat").innerHTML = "";
  });
  document.body.dataset.ready = "true";
});
