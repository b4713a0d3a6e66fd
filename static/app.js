// Test page for the ComfyUI bridge: plain JavaScript, no build step, no libraries.
//
// Flow: GET /workflow-list -> GET /workflow-info (builds the form) -> POST /upload for file
// inputs -> open WS /ws?clientId= -> POST /generate-based-workflow -> progress from the
// socket -> on "closed" GET /history, parsed with Response.formData().
"use strict";

(() => {
  const KEY_STORE = "comfy-bridge.api-key";
  const WORKFLOW_STORE = "comfy-bridge.workflow";

  // The page is served at "/" (or under a proxy prefix) and at "/static/index.html":
  // the API lives in the folder that holds the page, minus a trailing "static/".
  const BASE = new URL(location.pathname.replace(/[^/]*$/, "").replace(/static\/$/, ""), location.origin);

  const $ = (id) => document.getElementById(id);
  const el = {
    keyPanel: $("key-panel"), keyReason: $("key-reason"), keyForm: $("key-form"), keyInput: $("api-key"),
    form: $("job-form"), fields: $("job-fields"), workflow: $("workflow"), inputs: $("inputs"),
    generate: $("generate"), cancel: $("cancel"),
    progress: $("progress"), percent: $("percent"), status: $("status"), error: $("error"),
    clientId: $("client-id"), results: $("results"), count: $("count"), forgetKey: $("forget-key"),
  };

  let apiKey = storageGet(KEY_STORE) || "";
  let job = null;            // the job on screen: {clientId, socket, done, cancelled, sawProgress}
  let objectUrls = [];       // result blobs shown on the page, revoked when they are replaced
  let infoRequest = 0;       // ignores a slow /workflow-info answer after another pick

  // ---------------------------------------------------------------- small helpers

  function storageGet(name) {
    try { return localStorage.getItem(name); } catch (e) { return null; }
  }

  function storageSet(name, value) {
    try {
      if (value) localStorage.setItem(name, value); else localStorage.removeItem(name);
    } catch (e) { /* storage disabled: the value lasts for this page only */ }
  }

  function make(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "text") node.textContent = value;
      else if (name === "className") node.className = value;
      else node.setAttribute(name, value === true ? "" : value);
    }
    for (const child of children) if (child) node.append(child);
    return node;
  }

  // crypto.randomUUID exists only in secure contexts (https, localhost); a bridge on a LAN
  // address over plain http is not one, so build a version-4 uuid by hand there.
  function newClientId() {
    if (crypto.randomUUID) return crypto.randomUUID();
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  }

  function formatBytes(n) {
    if (n < 1024) return `${n} B`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
    return `${(n / 1024 / 1024).toFixed(1)} MB`;
  }

  // ---------------------------------------------------------------- talking to the bridge

  class BridgeError extends Error {
    constructor(message, status) { super(message); this.status = status; }
  }

  function url(path) {
    return new URL(path, BASE).toString();
  }

  function socketUrl(clientId) {
    const target = new URL("ws", BASE);
    target.protocol = target.protocol === "https:" ? "wss:" : "ws:";
    target.searchParams.set("clientId", clientId);
    if (apiKey) target.searchParams.set("token", apiKey);
    return target.toString();
  }

  async function detailOf(response) {
    const text = await response.text().catch(() => "");
    try {
      const body = JSON.parse(text);
      if (body && typeof body.detail === "string") return body.detail;
    } catch (e) { /* not JSON */ }
    return text.trim() || `${response.status} ${response.statusText}`.trim();
  }

  // fetch() with the API key; a 401 shows the key field and throws.
  async function request(path, options = {}) {
    const headers = new Headers(options.headers || {});
    if (apiKey) headers.set("Authorization", `Bearer ${apiKey}`);
    let response;
    try {
      response = await fetch(url(path), { ...options, headers });
    } catch (e) {
      throw new BridgeError(`cannot reach the bridge (${e.message})`, 0);
    }
    if (response.status === 401) {
      const detail = await detailOf(response);
      askForKey(apiKey ? "The API key was not accepted. Enter the right one." : "This bridge asks for an API key.");
      throw new BridgeError(detail, 401);
    }
    return response;
  }

  // request() that expects JSON back; any non-2xx status becomes an error with its detail.
  async function requestJson(path, options) {
    const response = await request(path, options);
    if (!response.ok) throw new BridgeError(await detailOf(response), response.status);
    return response.json();
  }

  // ---------------------------------------------------------------- status, errors

  function setStatus(text) {
    el.status.textContent = text;
  }

  function showError(message) {
    el.error.textContent = message;
    el.error.hidden = false;
  }

  function clearError() {
    el.error.textContent = "";
    el.error.hidden = true;
  }

  function setProgress(value) {
    const clamped = Math.max(0, Math.min(100, value));
    el.progress.value = clamped;
    el.percent.textContent = `${Math.round(clamped)}%`;
  }

  function setBusy(busy) {
    el.fields.disabled = busy;
    el.generate.disabled = busy || !el.workflow.value;
    el.cancel.disabled = !busy;
    document.body.classList.toggle("busy", busy);
  }

  // ---------------------------------------------------------------- API key

  function askForKey(reason) {
    el.keyReason.textContent = reason;
    el.keyPanel.hidden = false;
    el.keyInput.value = "";
    el.keyInput.focus();
  }

  function useKey(key) {
    apiKey = key;
    storageSet(KEY_STORE, key);
    el.forgetKey.hidden = !key;
  }

  el.keyForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = el.keyInput.value.trim();
    if (!key) return;
    useKey(key);
    clearError();
    if (await loadWorkflows()) {
      el.keyPanel.hidden = true;
      setStatus("API key accepted.");
    }
  });

  el.forgetKey.addEventListener("click", () => {
    useKey("");
    setStatus("API key forgotten.");
    loadWorkflows();
  });

  // ---------------------------------------------------------------- workflows and the form

  async function loadWorkflows() {
    let aliases;
    try {
      aliases = await requestJson("workflow-list");
    } catch (e) {
      if (e.status === 401) {
        el.workflow.replaceChildren(make("option", { value: "", text: "Enter the API key first" }));
      } else {
        showError(`Cannot load the workflow list: ${e.message}`);
      }
      return false;
    }
    const wanted = new URLSearchParams(location.search).get("workflow") || el.workflow.value
      || storageGet(WORKFLOW_STORE);
    el.workflow.replaceChildren(...aliases.map((alias) => make("option", { value: alias, text: alias })));
    if (!aliases.length) {
      el.workflow.append(make("option", { value: "", text: "No workflows on this bridge" }));
    } else if (aliases.includes(wanted)) {
      el.workflow.value = wanted;
    }
    el.workflow.disabled = !aliases.length;
    await loadInfo();
    refreshCount();
    return true;
  }

  async function loadInfo() {
    const alias = el.workflow.value;
    const ticket = ++infoRequest;
    el.inputs.replaceChildren();
    el.generate.disabled = true;
    if (!alias) return;
    storageSet(WORKFLOW_STORE, alias);
    let info;
    try {
      info = await requestJson(`workflow-info?workflow=${encodeURIComponent(alias)}`);
    } catch (e) {
      if (ticket === infoRequest && e.status !== 401) showError(`Cannot load the inputs of '${alias}': ${e.message}`);
      return;
    }
    if (ticket !== infoRequest) return;
    const entries = Object.entries(info);
    if (!entries.length) {
      el.inputs.append(make("p", { className: "muted", text: "This workflow has no inputs to set." }));
    }
    entries.forEach(([key, spec], index) => el.inputs.append(buildField(key, spec, index)));
    el.generate.disabled = !!job && !job.done;
  }

  el.workflow.addEventListener("change", () => {
    clearError();
    loadInfo();
  });

  // One form field for one exposed input "<node id>/<input name>".
  function buildField(key, spec, index) {
    const id = `input-${index}`;
    const name = key.includes("/") ? key.slice(key.indexOf("/") + 1) : key;
    const wrap = make("div", { className: `field type-${spec.type}` });
    wrap.dataset.key = key;
    wrap.dataset.type = spec.type;
    const label = make("label", { for: id },
      make("span", { className: "name", text: name }),
      make("span", { className: "where", text: `${spec.title || spec.class || "node"} · ${key}` }));
    const hintId = `${id}-hint`;

    if (spec.upload) {
      wrap.dataset.upload = "1";
      const picker = make("input", { id, type: "file", accept: "image/*,video/*,audio/*", "aria-describedby": hintId });
      const hint = make("p", { id: hintId, className: "hint",
        text: `Optional. Without a file the workflow's default (${spec.default}) is used.` });
      const preview = make("div", { className: "preview" });
      picker.addEventListener("change", () => startUpload(wrap, picker, hint, preview));
      wrap.append(label, picker, hint, preview);
      return wrap;
    }

    let control;
    if (Array.isArray(spec.choices) && spec.choices.length) {
      control = make("select", { id });
      for (const choice of spec.choices) control.append(make("option", { value: String(choice), text: String(choice) }));
      control.value = String(spec.default);
    } else if (spec.type === "bool") {
      control = make("input", { id, type: "checkbox" });
      control.checked = !!spec.default;
      wrap.classList.add("check");
      wrap.append(control, label);
      return wrap;
    } else if (spec.type === "int" || spec.type === "float") {
      control = make("input", {
        id, type: "number", inputmode: spec.type === "int" ? "numeric" : "decimal",
        step: spec.type === "int" ? "1" : "any", min: spec.min, max: spec.max,
      });
      control.value = spec.default ?? "";
    } else {
      const text = spec.default == null ? "" : String(spec.default);
      control = make("textarea", { id, rows: text.length > 60 ? 4 : 2, spellcheck: "true" });
      control.value = text;
    }
    wrap.append(label, control);
    return wrap;
  }

  // Uploads start as soon as a file is picked; Generate waits for them.
  function startUpload(wrap, picker, hint, preview) {
    const file = picker.files[0];
    delete wrap.dataset.saved;
    preview.replaceChildren();
    if (!file) {
      wrap.upload = null;
      hint.textContent = "No file chosen: the workflow's default is used.";
      return;
    }
    if (file.type.startsWith("image/")) {
      const src = URL.createObjectURL(file);
      const img = make("img", { src, alt: `Preview of ${file.name}` });
      img.addEventListener("load", () => URL.revokeObjectURL(src), { once: true });
      img.addEventListener("error", () => { URL.revokeObjectURL(src); img.remove(); }, { once: true });
      preview.append(img);
    }
    hint.textContent = `Uploading ${file.name} (${formatBytes(file.size)})…`;
    hint.classList.remove("bad");
    const body = new FormData();
    body.append(wrap.dataset.key, file, file.name);
    wrap.upload = requestJson("upload", { method: "POST", body }).then((saved) => {
      const name = saved[wrap.dataset.key];
      if (!name) throw new BridgeError("the bridge did not return a saved name", 0);
      wrap.dataset.saved = name;
      hint.textContent = `Uploaded ${file.name} as ${name}.`;
      return name;
    }).catch((e) => {
      hint.textContent = `Upload failed: ${e.message}`;
      hint.classList.add("bad");
      throw new BridgeError(`upload of ${file.name} failed: ${e.message}`, e.status);
    });
    wrap.upload.catch(() => {});  // reported in the hint; Generate reports it again
  }

  // The request body from the form: {"workflow": alias, "<node>/<input>": value, ...}.
  async function collectInputs() {
    const body = { workflow: el.workflow.value };
    for (const wrap of el.inputs.querySelectorAll(".field")) {
      const { key, type } = wrap.dataset;
      if (wrap.dataset.upload) {
        if (wrap.upload) body[key] = await wrap.upload;
        continue;
      }
      const control = wrap.querySelector("input, textarea, select");
      if (type === "bool") {
        body[key] = control.checked;
      } else if (type === "int" || type === "float") {
        const raw = control.value.trim();
        if (raw === "") continue;  // empty keeps the workflow's default
        const number = Number(raw);
        if (!Number.isFinite(number) || (type === "int" && !Number.isInteger(number))) {
          control.focus();
          throw new BridgeError(`${key} must be ${type === "int" ? "a whole number" : "a number"}`, 0);
        }
        body[key] = number;
      } else {
        body[key] = control.value;
      }
    }
    return body;
  }

  // ---------------------------------------------------------------- running a job

  el.form.addEventListener("submit", (event) => {
    event.preventDefault();
    generate();
  });

  async function generate() {
    if (job && !job.done) return;
    clearError();
    setBusy(true);
    let body;
    try {
      setStatus("Preparing inputs…");
      body = await collectInputs();
    } catch (e) {
      setBusy(false);
      setProgress(0);
      setStatus("Not started.");
      showError(e.message);
      return;
    }

    const current = { clientId: newClientId(), socket: null, done: false, cancelled: false, sawProgress: false };
    job = current;
    el.clientId.textContent = current.clientId;
    clearResults();
    setProgress(0);
    setStatus("Connecting…");

    // The socket first, so no progress message is missed.
    try {
      current.socket = await openSocket(current);
    } catch (e) {
      return finish(current, `Cannot open the status websocket: ${e.message}`);
    }
    try {
      const answer = await requestJson(`generate-based-workflow?clientId=${encodeURIComponent(current.clientId)}`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      if (!current.done && !current.sawProgress) setStatus(`Queued (${answer.detail}).`);
    } catch (e) {
      current.socket.close();
      return finish(current, e.message);
    }
  }

  function openSocket(current) {
    return new Promise((resolve, reject) => {
      const socket = new WebSocket(socketUrl(current.clientId));
      let opened = false;
      socket.addEventListener("open", () => { opened = true; resolve(socket); });
      socket.addEventListener("error", () => {
        if (!opened) reject(new Error("the connection was refused (wrong API key or bridge down?)"));
      });
      socket.addEventListener("message", (event) => onMessage(current, event.data));
      socket.addEventListener("close", () => {
        // The server closes after its final message; a close without one (network, restart)
        // leaves the job running, so follow it by polling instead.
        if (opened && !current.final && !current.done && job === current) pollStatus(current);
      });
    });
  }

  function onMessage(current, raw) {
    let message;
    try { message = JSON.parse(raw); } catch (e) { return; }
    handleStatus(current, message.status, message.detail ?? message.details ?? "");
  }

  // Status words are the same on the socket and from /execution-info.
  function handleStatus(current, status, detail) {
    if (current.done || job !== current) return;
    if (status === "closed" || status === "error") current.final = true;
    switch (status) {
      case "connected":
        if (!current.sawProgress) setStatus(detail.startsWith("queued") ? `Waiting for a backend (${detail}).` : "Connected, waiting…");
        break;
      case "listening":
        break;  // heartbeat
      case "progress": {
        current.sawProgress = true;
        const value = parseFloat(detail);
        if (Number.isFinite(value)) setProgress(Math.max(value, el.progress.value));
        setStatus(`Running… ${detail}`);
        break;
      }
      case "closed":
        if (detail === "replaced by a new connection") {
          finish(current, "Another page opened a websocket with this client ID.");
        } else {
          setProgress(100);
          setStatus("Done. Fetching results…");
          fetchResults(current);
        }
        break;
      case "error":
        finish(current, current.cancelled && /^interrupted/.test(detail) ? null : detail);
        break;
      default:
        break;
    }
  }

  async function pollStatus(current) {
    setStatus("Status connection lost; checking the job…");
    while (!current.done && job === current) {
      try {
        const info = await requestJson(`execution-info?clientId=${encodeURIComponent(current.clientId)}`);
        handleStatus(current, info.status, info.detail ?? info.details ?? "");
        if (info.status === "closed" || info.status === "error") return;
      } catch (e) {
        return finish(current, `Lost track of the job: ${e.message}`);
      }
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  }

  async function fetchResults(current) {
    if (current.fetching) return;
    current.fetching = true;
    let response;
    try {
      response = await request(`history?clientId=${encodeURIComponent(current.clientId)}`);
    } catch (e) {
      return finish(current, `Cannot fetch the results: ${e.message}`);
    }
    if (response.status === 204) {
      return finish(current, response.headers.get("X-Bridge-Detail") || "The bridge has no results for this job.");
    }
    if (!response.ok) return finish(current, await detailOf(response));
    let form;
    try {
      form = await response.formData();
    } catch (e) {
      return finish(current, `The results could not be read: ${e.message}`);
    }
    const files = [];
    for (const [name, value] of form.entries()) {
      if (typeof value !== "string") files.push({ name, file: value });
    }
    showResults(files);
    finish(current, null, files.length
      ? `Done: ${files.length} ${files.length === 1 ? "file" : "files"}.`
      : "Done: the workflow produced no files.");
  }

  function finish(current, error, message) {
    if (current.done) return;
    current.done = true;
    if (current.socket && current.socket.readyState <= WebSocket.OPEN) current.socket.close();
    if (job !== current) return;
    setBusy(false);
    if (current.cancelled) {
      setStatus("Cancelled.");
    } else if (error) {
      setStatus("Failed.");
      showError(error);
    } else {
      setStatus(message || "Done.");
    }
    refreshCount();
  }

  el.cancel.addEventListener("click", async () => {
    const current = job;
    if (!current || current.done) return;
    current.cancelled = true;
    el.cancel.disabled = true;
    setStatus("Cancelling…");
    try {
      await requestJson(`interrupt?clientId=${encodeURIComponent(current.clientId)}`, { method: "POST" });
    } catch (e) {
      // The job may not have reached the bridge yet: closing the socket cancels it anyway.
      if (e.status !== 400) showError(`Cancel failed: ${e.message}`);
    }
    // The socket reports "error: interrupted"; if it is gone already, end here.
    if (!current.socket || current.socket.readyState !== WebSocket.OPEN) finish(current, null);
  });

  // ---------------------------------------------------------------- results

  function clearResults() {
    for (const href of objectUrls) URL.revokeObjectURL(href);
    objectUrls = [];
    el.results.replaceChildren();
  }

  function showResults(files) {
    clearResults();
    files.forEach(({ name, file }, index) => {
      const href = URL.createObjectURL(file);
      objectUrls.push(href);
      const type = file.type || "";
      const title = file.name || name;
      let media;
      if (type.startsWith("image/")) media = make("img", { src: href, alt: `Result ${index + 1}: ${title}` });
      else if (type.startsWith("video/")) media = make("video", { src: href, controls: true, playsinline: true, loop: true, "aria-label": `Result ${index + 1}: ${title}` });
      else if (type.startsWith("audio/")) media = make("audio", { src: href, controls: true, "aria-label": `Result ${index + 1}: ${title}` });
      const caption = make("figcaption", {},
        make("span", { className: "file", text: title }),
        make("span", { className: "muted", text: `${type || "unknown type"} · ${formatBytes(file.size)}` }),
        make("a", { href, download: title, text: "Download" }));
      el.results.append(make("figure", { className: "result" }, media, caption));
    });
  }

  async function refreshCount() {
    try {
      const count = await requestJson("generation-count");
      el.count.textContent = `${count} ${count === 1 ? "generation" : "generations"} on this bridge so far`;
    } catch (e) { /* optional decoration */ }
  }

  // ---------------------------------------------------------------- start

  el.forgetKey.hidden = !apiKey;
  loadWorkflows();
})();
