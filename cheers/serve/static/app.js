// The cheers page: chat with images (streamed answers) and image generation, over the
// server's own OpenAI-style routes. Plain JS, no build step, nothing fetched from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, messages: [], attachments: [] };

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function headers(json = true) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || response.statusText;
  } catch (e) {
    return response.status + " " + response.statusText;
  }
}

function readDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function addMessage(role, text, images = []) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  for (const src of images) {
    const img = document.createElement("img");
    img.src = src;
    img.alt = "attached image";
    div.appendChild(img);
  }
  const span = document.createElement("span");
  span.className = "text";
  span.textContent = text;
  div.appendChild(span);
  $("chat-log").appendChild(div);
  $("chat-log").scrollTop = $("chat-log").scrollHeight;
  return span;
}

function showAttachments() {
  const box = $("chat-attachments");
  box.replaceChildren();
  for (const src of state.attachments) {
    const img = document.createElement("img");
    img.src = src;
    img.alt = "image to send";
    box.appendChild(img);
  }
}

// Yields the JSON payload of every server-sent event of a streamed response.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function sendChat(event) {
  event.preventDefault();
  const question = $("chat-input").value.trim();
  if (!question) return;
  const content = [{ type: "text", text: question }];
  for (const url of state.attachments) content.push({ type: "image_url", image_url: { url } });
  addMessage("user", question, state.attachments);
  state.messages.push({ role: "user", content });
  state.attachments = [];
  showAttachments();
  $("chat-input").value = "";
  $("chat-send").disabled = true;
  const answer = addMessage("assistant", "");
  answer.parentElement.classList.add("streaming");
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify({
        model: state.model,
        messages: state.messages,
        stream: true,
        max_tokens: Number($("chat-max-tokens").value) || 64,
        temperature: Number($("chat-temperature").value) || 0,
      }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) answer.textContent += delta.content;
    }
    state.messages.push({ role: "assistant", content: answer.textContent });
    setStatus("");
  } catch (e) {
    state.messages.pop();
    answer.parentElement.classList.add("error");
    answer.textContent = "error: " + e.message;
  } finally {
    answer.parentElement.classList.remove("streaming");
    answer.parentElement.classList.add("done");
    $("chat-send").disabled = false;
  }
}

async function generate(event) {
  event.preventDefault();
  const prompt = $("gen-prompt").value.trim();
  if (!prompt) return;
  const body = { model: state.model, prompt, n: Number($("gen-n").value) || 1, response_format: "b64_json" };
  for (const [id, key] of [["gen-seed", "seed"], ["gen-steps", "steps"], ["gen-guidance", "guidance_scale"]]) {
    if ($(id).value !== "") body[key] = Number($(id).value);
  }
  $("gen-button").disabled = true;
  setStatus("generating...");
  try {
    const response = await fetch("/v1/images/generations", {
      method: "POST", headers: headers(), body: JSON.stringify(body),
    });
    if (!response.ok) throw new Error(await errorText(response));
    const result = await response.json();
    const grid = $("gen-grid");
    grid.replaceChildren();
    for (const item of result.data) {
      const figure = document.createElement("figure");
      const img = document.createElement("img");
      img.src = "data:image/png;base64," + item.b64_json;
      img.alt = prompt + " (seed " + item.seed + ")";
      const caption = document.createElement("figcaption");
      caption.textContent = "seed " + item.seed;
      figure.append(img, caption);
      grid.appendChild(figure);
    }
    setStatus("");
  } catch (e) {
    setStatus("error: " + e.message, true);
  } finally {
    $("gen-button").disabled = false;
  }
}

async function init() {
  $("chat-form").addEventListener("submit", sendChat);
  $("gen-form").addEventListener("submit", generate);
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) sendChat(e);
  });
  $("chat-clear").addEventListener("click", () => {
    state.messages = [];
    state.attachments = [];
    showAttachments();
    $("chat-log").replaceChildren();
  });
  $("chat-file").addEventListener("change", async () => {
    for (const file of $("chat-file").files) state.attachments.push(await readDataUrl(file));
    $("chat-file").value = "";
    showAttachments();
  });
  try {
    const health = await (await fetch("/health")).json();
    state.model = health.model;
    $("model-name").textContent = health.model + " · " + health.image_size + " px";
    $("gen-steps").value = health.sampling.steps;
    $("gen-guidance").value = health.sampling.guidance_scale;
    $("key-label").hidden = !health.api_key_required;
    document.body.dataset.ready = "1";
  } catch (e) {
    setStatus("the server does not answer: " + e.message, true);
  }
}

init();
