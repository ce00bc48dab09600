// diffusekit serve: the page. Plain JavaScript, no build step, nothing loaded from other sites.
// It submits jobs to /api/jobs, follows them through the server-sent events of /api/events, and reads the
// settings stored in PNGs through /sdapi/v1/png-info.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  mode: "txt2img", jobs: new Map(), initImage: null, maskImage: null, lastSeed: null, info: null,
  mine: new Set(), // jobs submitted from this page
};

// ------------------------------------------------------------------------------------------------ helpers
async function api(path, options = {}) {
  const init = { ...options, headers: { ...(options.headers || {}) } };
  if (options.body !== undefined) {
    init.method = init.method || "POST";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(options.body);
  }
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.detail || `${response.status} ${response.statusText}`);
  return data;
}

function say(text, error = false) {
  const m = $("message");
  m.textContent = text;
  m.classList.toggle("error", error);
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result); // a data: URL; the server accepts it as base64
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

// ------------------------------------------------------------------------------------------------ the form
function setMode(mode) {
  state.mode = mode;
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.mode === mode);
  $("img2img-panel").hidden = mode !== "img2img";
}

function numberOrNull(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

function formBody() {
  const body = {
    prompt: $("prompt").value, negative_prompt: $("negative").value, sampler_name: $("sampler").value || null,
    steps: numberOrNull("steps"), cfg_scale: numberOrNull("cfg"), seed: numberOrNull("seed") ?? -1,
    batch_size: numberOrNull("batch-size") ?? 1, n_iter: numberOrNull("n-iter") ?? 1, mode: state.mode,
  };
  const w = numberOrNull("width"), h = numberOrNull("height");
  if (w !== null || h !== null) { body.width = w; body.height = h; }
  if (state.mode === "img2img") {
    if (!state.initImage) throw new Error("img2img needs an input image: choose one, or 'send to img2img' from the gallery");
    body.init_images = [state.initImage];
    body.denoising_strength = Number($("strength").value);
    if (state.maskImage) body.mask = state.maskImage;
  }
  return body;
}

function applySettings(s) {
  // API fields (from png-info or a gallery image) -> the form
  if (s.prompt !== undefined && s.prompt !== null) $("prompt").value = s.prompt;
  if (s.negative_prompt !== undefined && s.negative_prompt !== null) $("negative").value = s.negative_prompt;
  for (const [field, id] of [["steps", "steps"], ["cfg_scale", "cfg"], ["seed", "seed"], ["width", "width"],
                             ["height", "height"]]) {
    if (s[field] !== undefined && s[field] !== null) $(id).value = s[field];
  }
  if (s.sampler_name) {
    const option = [...$("sampler").options].find((o) => o.value === s.sampler_name);
    if (option) $("sampler").value = s.sampler_name;
  }
  if (s.denoising_strength !== undefined && s.denoising_strength !== null) {
    $("strength").value = s.denoising_strength;
    $("strength-value").textContent = s.denoising_strength;
  }
}

async function submit(event) {
  event.preventDefault();
  let body;
  try { body = formBody(); } catch (e) { say(e.message, true); return; }
  const repeat = Math.max(1, Math.min(100, Number($("repeat").value) || 1));
  let queued = 0;
  for (let i = 0; i < repeat; i++) {
    try {
      const job = await api("/api/jobs", { body });
      state.mine.add(job.id);
      update(job);
      queued++;
    } catch (e) {
      say(e.message, true);
      return;
    }
  }
  say(queued === 1 ? "queued" : `queued ${queued} jobs`);
}

async function loadPng(file) {
  if (!file) return;
  try {
    const data = await api("/sdapi/v1/png-info", { body: { image: await readFile(file) } });
    if (!data.info && !Object.keys(data.parameters || {}).length) { say(`${file.name}: no settings found`, true); return; }
    applySettings(data.parameters || {});
    say(`settings loaded from ${file.name}`);
  } catch (e) { say(`${file.name}: ${e.message}`, true); }
}

// ------------------------------------------------------------------------------------------------ jobs
function update(job) {
  const known = state.jobs.get(job.id);
  if (known && known.version > job.version) return; // an older answer that arrived late
  state.jobs.set(job.id, job);
  renderJob(job);
  renderGallery(job);
  renderCurrent();
}

function visible(job) { return !job.restored || $("show-earlier").checked; }

function renderJob(job) {
  let li = document.querySelector(`#queue li[data-id="${job.id}"]`);
  const finished = ["done", "failed", "cancelled"].includes(job.state);
  if (finished && job.state === "done") { if (li) li.remove(); return; }
  if (job.restored) { if (li) li.remove(); return; }
  if (!li) {
    li = el("li", { "data-id": job.id });
    $("queue").append(li);
  }
  const label = job.state === "queued" && job.position !== null ? `queued #${job.position + 1}` : job.state;
  const progress = job.state === "running" ? ` ${job.step}/${job.steps}` : "";
  li.replaceChildren(
    el("span", { class: `state ${job.state}` }, label + progress),
    el("span", { class: "prompt", title: job.settings.prompt || "" }, job.settings.prompt || "(empty prompt)"),
  );
  if (job.error) li.append(el("span", { class: "muted" }, job.error));
  if (!finished) {
    li.append(el("button", { type: "button", class: "small cancel", onclick: () => cancel(job.id) }, "cancel"));
  } else {
    li.append(el("button", { type: "button", class: "small", onclick: () => li.remove() }, "×"));
  }
}

function renderGallery(job) {
  if (!visible(job)) return;
  job.images.forEach((image, i) => {
    const key = `${job.id}/${i}`;
    if (document.querySelector(`figure[data-key="${key}"]`)) return;
    state.lastSeed = image.seed;
    const img = el("img", { src: image.url, alt: image.infotext, title: "show settings", loading: "lazy" });
    img.addEventListener("click", () => showDetails(image));
    const figure = el("figure", { "data-key": key, "data-seed": image.seed },
      img,
      el("figcaption", { title: image.settings.prompt || "" }, `seed ${image.seed} · ${image.settings.prompt || ""}`),
      el("div", { class: "row" },
        el("button", { type: "button", class: "use", onclick: () => { applySettings(image.settings); say("settings loaded"); } }, "use settings"),
        el("button", { type: "button", class: "to-img2img", onclick: () => sendToImg2img(image) }, "to img2img"),
        el("button", { type: "button", class: "copy", onclick: () => copy(image.infotext) }, "copy"),
        el("a", { class: "button download", href: image.url, download: image.file }, "download"),
      ),
    );
    $("gallery").prepend(figure);
  });
}

function renderCurrent() {
  const running = [...state.jobs.values()].find((j) => j.state === "running");
  const waiting = [...state.jobs.values()].filter((j) => j.state === "queued").length;
  if (!running) {
    $("progress-bar").style.width = "0";
    $("status").textContent = waiting ? `${waiting} queued` : "idle";
    $("preview").hidden = true;
    return;
  }
  $("progress-bar").style.width = `${Math.round(running.progress * 100)}%`;
  const eta = running.eta_s !== null ? `, about ${Math.ceil(running.eta_s)} s left` : "";
  $("status").textContent = `running: step ${running.step} of ${running.steps}${eta}` + (waiting ? ` · ${waiting} queued` : "");
  if (running.preview !== null) {
    const src = `/api/jobs/${running.id}/preview?v=${running.preview}`;
    if ($("preview").dataset.src !== src) {
      $("preview").dataset.src = src;
      $("preview").src = src;
    }
    $("preview").hidden = false;
  }
}

async function cancel(id) {
  try { update(await api(`/api/jobs/${id}/cancel`, { method: "POST" })); } catch (e) { say(e.message, true); }
}

async function cancelAll() {
  for (const job of state.jobs.values()) if (["queued", "running"].includes(job.state)) await cancel(job.id);
}

function showDetails(image) {
  $("details").hidden = false;
  $("details-text").textContent = image.infotext;
}

async function copy(text) {
  try { await navigator.clipboard.writeText(text); } catch {
    const area = el("textarea", {}, text);
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  say("settings copied");
}

async function sendToImg2img(image) {
  const blob = await (await fetch(image.url)).blob();
  state.initImage = await readFile(blob);
  $("init-thumb").src = state.initImage;
  $("init-thumb").hidden = false;
  applySettings(image.settings);
  setMode("img2img");
  say("image sent to img2img");
}

// ------------------------------------------------------------------------------------------------ events
function listen() {
  const source = new EventSource("/api/events");
  source.onopen = () => $("connection").classList.add("live");
  source.onerror = () => $("connection").classList.remove("live");
  source.addEventListener("job", (event) => update(JSON.parse(event.data)));
}

async function start() {
  try {
    const info = await api("/api/info");
    state.info = info;
    $("model").textContent = `${info.model} · diffusekit ${info.version}`;
    const select = $("sampler");
    select.append(el("option", { value: "" }, `${info.sampler} (the model's own)`));
    for (const s of info.samplers) select.append(el("option", { value: s.name }, s.name));
    $("width").placeholder = $("height").placeholder = String(info.native_size);
    $("width").step = $("height").step = String(info.size_multiple);
  } catch (e) { say(e.message, true); }
  listen();
}

$("form").addEventListener("submit", submit);
for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => setMode(tab.dataset.mode));
$("seed-random").addEventListener("click", () => { $("seed").value = -1; });
$("seed-reuse").addEventListener("click", () => { if (state.lastSeed !== null) $("seed").value = state.lastSeed; });
$("strength").addEventListener("input", () => { $("strength-value").textContent = $("strength").value; });
$("cancel-all").addEventListener("click", cancelAll);
$("load-png").addEventListener("change", (e) => loadPng(e.target.files[0]));
$("init-file").addEventListener("change", async (e) => {
  if (!e.target.files[0]) return;
  state.initImage = await readFile(e.target.files[0]);
  $("init-thumb").src = state.initImage;
  $("init-thumb").hidden = false;
});
$("mask-file").addEventListener("change", async (e) => {
  if (!e.target.files[0]) return;
  state.maskImage = await readFile(e.target.files[0]);
  $("mask-thumb").src = state.maskImage;
  $("mask-thumb").hidden = false;
});
$("clear-init").addEventListener("click", () => {
  state.initImage = state.maskImage = null;
  $("init-thumb").hidden = $("mask-thumb").hidden = true;
});
$("show-earlier").addEventListener("change", () => {
  $("gallery").replaceChildren();
  for (const job of [...state.jobs.values()].sort((a, b) => a.number - b.number)) renderGallery(job);
});
let dragDepth = 0;
window.addEventListener("dragenter", (e) => { e.preventDefault(); dragDepth++; $("drop-hint").hidden = false; });
window.addEventListener("dragleave", () => { if (--dragDepth <= 0) { dragDepth = 0; $("drop-hint").hidden = true; } });
window.addEventListener("dragover", (e) => e.preventDefault());
window.addEventListener("drop", (e) => {
  e.preventDefault();
  dragDepth = 0;
  $("drop-hint").hidden = true;
  const file = e.dataTransfer && e.dataTransfer.files[0];
  if (file) loadPng(file);
});
start();
