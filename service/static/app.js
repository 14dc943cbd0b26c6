// Search page: sends the chosen image to POST /search and renders the response.
// Plain JavaScript with no build step and no third-party code; the server serves this file.
"use strict";

(function () {
  const API_KEY_STORAGE = "idml-search.api-key";
  const MAX_ATTRIBUTES_SHOWN = 3;

  const elements = {
    form: document.getElementById("search-form"),
    dropZone: document.getElementById("drop-zone"),
    input: document.getElementById("image-input"),
    preview: document.getElementById("preview"),
    previewNote: document.getElementById("preview-note"),
    k: document.getElementById("k-input"),
    button: document.getElementById("search-button"),
    apiKeyDetails: document.getElementById("api-key-details"),
    apiKey: document.getElementById("api-key-input"),
    status: document.getElementById("status"),
    error: document.getElementById("error"),
    querySummary: document.getElementById("query-summary"),
    uncertaintyBar: document.getElementById("uncertainty-bar"),
    uncertaintyThreshold: document.getElementById("uncertainty-threshold"),
    uncertaintyValue: document.getElementById("uncertainty-value"),
    uncertaintyScale: document.getElementById("uncertainty-scale"),
    ambiguousFlag: document.getElementById("ambiguous-flag"),
    queryDetails: document.getElementById("query-details"),
    results: document.getElementById("results"),
    resultsEmpty: document.getElementById("results-empty"),
    resultTemplate: document.getElementById("result-template"),
    runInfo: document.getElementById("run-info"),
    modelId: document.getElementById("model-id"),
    timings: document.getElementById("timings"),
  };

  let currentFile = null;
  let previewUrl = null;
  let thumbnailUrls = [];
  let inFlight = null;

  // ---- input: file picker and drag and drop ----

  function chooseFile(file) {
    if (!file) {
      return;
    }
    currentFile = file;
    showPreview(file);
    elements.button.disabled = false;
    search();
  }

  function showPreview(file) {
    if (previewUrl) {
      URL.revokeObjectURL(previewUrl);
    }
    previewUrl = URL.createObjectURL(file);
    elements.preview.alt = "Query image: " + file.name;
    elements.preview.hidden = false;
    elements.previewNote.textContent = file.name + " (" + formatBytes(file.size) + ")";
    // Browsers cannot show every format the server decodes (TIFF, HEIF); the search still runs.
    elements.preview.onerror = function () {
      elements.preview.hidden = true;
      elements.previewNote.textContent = file.name + ": this browser cannot preview the file, "
        + "but the server may still decode it.";
    };
    elements.preview.src = previewUrl;
  }

  elements.input.addEventListener("change", function () {
    chooseFile(elements.input.files[0]);
  });

  ["dragenter", "dragover"].forEach(function (type) {
    elements.dropZone.addEventListener(type, function (event) {
      event.preventDefault();
      event.dataTransfer.dropEffect = "copy";
      elements.dropZone.classList.add("dragging");
    });
  });
  elements.dropZone.addEventListener("dragleave", function (event) {
    if (!elements.dropZone.contains(event.relatedTarget)) {
      elements.dropZone.classList.remove("dragging");
    }
  });
  elements.dropZone.addEventListener("drop", function (event) {
    event.preventDefault();
    elements.dropZone.classList.remove("dragging");
    const files = event.dataTransfer.files;
    if (files.length === 0) {
      showError("The dropped item is not a file. Drop an image file, or choose one with the button.");
      return;
    }
    elements.input.files = files;
    chooseFile(files[0]);
  });
  // A file dropped next to the drop zone would make the browser leave the page to open it.
  window.addEventListener("dragover", function (event) { event.preventDefault(); });
  window.addEventListener("drop", function (event) { event.preventDefault(); });

  elements.form.addEventListener("submit", function (event) {
    event.preventDefault();
    search();
  });

  // ---- API key, kept for this tab only ----

  elements.apiKey.value = sessionStorage.getItem(API_KEY_STORAGE) || "";
  if (elements.apiKey.value) {
    elements.apiKeyDetails.open = true;
  }
  elements.apiKey.addEventListener("change", function () {
    sessionStorage.setItem(API_KEY_STORAGE, elements.apiKey.value.trim());
  });

  function authHeaders() {
    const key = elements.apiKey.value.trim();
    return key ? { "X-API-Key": key } : {};
  }

  // ---- search ----

  async function search() {
    if (!currentFile) {
      showError("Choose an image first.");
      return;
    }
    const k = Number(elements.k.value);
    if (!Number.isInteger(k) || k < 1 || k > 100) {
      showError("Results must be a whole number from 1 to 100, got " + JSON.stringify(elements.k.value) + ".");
      elements.k.focus();
      return;
    }
    if (inFlight) {
      inFlight.abort();
    }
    const controller = new AbortController();
    inFlight = controller;

    const body = new FormData();
    body.append("image", currentFile, currentFile.name);
    hideError();
    setStatus("Searching for images similar to " + currentFile.name + "…");
    document.body.classList.add("busy");

    let response;
    let payload = null;
    try {
      response = await fetch(new URL("search?k=" + k, document.baseURI), {
        method: "POST",
        body: body,
        headers: authHeaders(),
        signal: controller.signal,
      });
      payload = await readJson(response);
    } catch (error) {
      if (error.name === "AbortError") {
        return;
      }
      finishSearch(controller);
      setStatus("");
      clearResults();
      showError("The search request failed: " + error.message + ". Check that the server is running.");
      return;
    }
    if (inFlight !== controller) {
      return;
    }
    finishSearch(controller);

    if (!response.ok) {
      setStatus("");
      clearResults();
      showApiError(response, payload);
      return;
    }
    renderResponse(payload);
  }

  function finishSearch(controller) {
    if (inFlight === controller) {
      inFlight = null;
    }
    document.body.classList.remove("busy");
  }

  async function readJson(response) {
    const text = await response.text();
    if (!text) {
      return null;
    }
    try {
      return JSON.parse(text);
    } catch (error) {
      return { error: { code: "invalid_response", message: text.slice(0, 300) } };
    }
  }

  function showApiError(response, payload) {
    const apiError = payload && payload.error ? payload.error : null;
    const message = apiError && apiError.message ? apiError.message : response.statusText || "no details";
    const code = apiError && apiError.code ? apiError.code : "http_" + response.status;
    let text = "The server rejected the search (" + response.status + " " + code + "): " + message;
    if (apiError && apiError.request_id) {
      text += " [request id " + apiError.request_id + "]";
    }
    showError(text);
    if (response.status === 401 || response.status === 403) {
      elements.apiKeyDetails.open = true;
      elements.apiKey.focus();
    }
  }

  // ---- rendering ----

  function renderResponse(payload) {
    payload = payload || {};
    const results = Array.isArray(payload.results) ? payload.results : [];
    renderQuery(payload.query || {});
    renderResults(results);
    renderRunInfo(payload);
    const ambiguous = payload.query && payload.query.ambiguous ? " The query is ambiguous." : "";
    setStatus(results.length + (results.length === 1 ? " similar image found." : " similar images found.") + ambiguous);
  }

  function renderQuery(query) {
    const uncertainty = Number(query.uncertainty);
    const threshold = Number(query.ambiguity_threshold);
    const hasThreshold = Number.isFinite(threshold) && threshold > 0;
    // With the server's ambiguity threshold the bar is full at twice the threshold, so the
    // threshold mark sits in the middle. Without it, u / (1 + u) maps [0, inf) onto [0, 1).
    let fraction;
    if (!Number.isFinite(uncertainty)) {
      fraction = 0;
    } else if (hasThreshold) {
      fraction = Math.min(1, uncertainty / (2 * threshold));
    } else {
      fraction = uncertainty / (1 + uncertainty);
    }
    setBar(elements.uncertaintyBar, fraction, formatNumber(uncertainty, 3));
    elements.uncertaintyThreshold.hidden = !hasThreshold;
    if (hasThreshold) {
      elements.uncertaintyThreshold.style.left = "50%";
      elements.uncertaintyThreshold.title = "ambiguity threshold " + formatNumber(threshold, 3);
    }
    elements.uncertaintyValue.textContent = formatNumber(uncertainty, 3);
    elements.uncertaintyScale.hidden = !hasThreshold;
    elements.uncertaintyScale.textContent = hasThreshold
      ? "Ambiguous above " + formatNumber(threshold, 3) + ", the mark on the bar."
      : "";
    elements.uncertaintyBar.classList.toggle("high", Boolean(query.ambiguous));
    elements.ambiguousFlag.hidden = !query.ambiguous;

    const details = [];
    if (query.width && query.height) {
      details.push(query.width + " × " + query.height + " px");
    }
    if (query.format) {
      details.push(query.format);
    }
    if (query.frames && query.frames > 1) {
      details.push(query.frames + " frames, the first one searched");
    }
    elements.queryDetails.textContent = details.join(" · ");
    elements.querySummary.hidden = false;
  }

  // Hides the previous response, so that an error is not shown next to stale matches.
  function clearResults() {
    renderResults([]);
    elements.resultsEmpty.textContent = "Results appear here after a search.";
    elements.querySummary.hidden = true;
    elements.runInfo.hidden = true;
  }

  function renderResults(results) {
    thumbnailUrls.forEach(function (url) { URL.revokeObjectURL(url); });
    thumbnailUrls = [];
    elements.results.replaceChildren();
    elements.resultsEmpty.hidden = results.length > 0;
    if (results.length === 0) {
      elements.resultsEmpty.textContent = "The catalog returned no matches. Is the catalog empty?";
    }
    results.forEach(function (result, position) {
      elements.results.appendChild(renderResult(result, position + 1));
    });
  }

  function renderResult(result, rank) {
    const item = elements.resultTemplate.content.firstElementChild.cloneNode(true);
    const label = result.label === null || result.label === undefined || result.label === "" ? "unlabelled" : String(result.label);
    const confidence = Number(result.confidence);
    const percent = formatPercent(confidence);

    item.dataset.id = result.id;
    item.dataset.confidence = Number.isFinite(confidence) ? String(confidence) : "";
    item.querySelector(".result-rank").textContent = rank + ".";
    item.querySelector(".result-label").textContent = label;
    item.querySelector(".result-id").textContent = "id " + result.id;
    item.querySelector(".result-attributes").textContent = describeAttributes(result.attributes);

    const image = item.querySelector(".thumb-image");
    image.alt = "Match " + rank + ": " + label + " (id " + result.id + ")";
    loadThumbnail(image, result.image_url);

    const bar = item.querySelector(".confidence-bar");
    bar.setAttribute("aria-label", "Confidence that match " + rank + " shows the same thing as the query");
    setBar(bar, Number.isFinite(confidence) ? confidence : 0, percent);
    bar.classList.add(confidenceClass(confidence));
    item.querySelector(".confidence-value").textContent = percent;

    const scores = [
      "similarity " + formatNumber(result.similarity, 3),
      "introspective distance " + formatNumber(result.distance, 3),
    ];
    if (Number.isInteger(result.semantic_rank) && result.semantic_rank !== rank) {
      scores.push("rank " + result.semantic_rank + " by similarity alone");
    }
    item.querySelector(".result-scores").textContent = scores.join(" · ");
    return item;
  }

  function loadThumbnail(image, url) {
    if (!url) {
      image.replaceWith(placeholder("no image stored"));
      return;
    }
    image.addEventListener("error", function () {
      image.replaceWith(placeholder("image failed to load"));
    });
    const headers = authHeaders();
    if (Object.keys(headers).length === 0) {
      image.src = url;
      return;
    }
    // An <img> cannot send the key, so with a key the image is fetched and shown from a blob.
    fetch(new URL(url, document.baseURI), { headers: headers })
      .then(function (response) {
        if (!response.ok) {
          throw new Error("HTTP " + response.status);
        }
        return response.blob();
      })
      .then(function (blob) {
        const blobUrl = URL.createObjectURL(blob);
        thumbnailUrls.push(blobUrl);
        image.src = blobUrl;
      })
      .catch(function () {
        image.replaceWith(placeholder("image failed to load"));
      });
  }

  function placeholder(text) {
    const element = document.createElement("span");
    element.className = "thumb-missing";
    element.textContent = text;
    return element;
  }

  function renderRunInfo(payload) {
    elements.modelId.textContent = payload.model_id || "unknown";
    const timings = payload.timings_ms || {};
    const stages = ["decode", "preprocess", "embed", "search", "rerank", "total"];
    const parts = stages
      .filter(function (stage) { return Number.isFinite(Number(timings[stage])); })
      .map(function (stage) { return stage + " " + formatNumber(timings[stage], 1) + " ms"; });
    elements.timings.textContent = parts.length ? "Server time: " + parts.join(" · ") : "";
    elements.runInfo.hidden = false;
  }

  // ---- helpers ----

  function setBar(bar, fraction, valueText) {
    const clamped = Math.max(0, Math.min(1, fraction));
    bar.querySelector(".bar-fill").style.width = (clamped * 100).toFixed(1) + "%";
    bar.setAttribute("aria-valuenow", (clamped * 100).toFixed(0));
    bar.setAttribute("aria-valuetext", valueText);
  }

  function confidenceClass(confidence) {
    if (!(confidence >= 0.5)) {
      return "low";
    }
    return confidence >= 0.8 ? "high" : "medium";
  }

  function describeAttributes(attributes) {
    if (!attributes || typeof attributes !== "object") {
      return "";
    }
    return Object.keys(attributes)
      .slice(0, MAX_ATTRIBUTES_SHOWN)
      .map(function (key) { return key + ": " + attributes[key]; })
      .join(" · ");
  }

  function formatPercent(fraction) {
    if (!Number.isFinite(fraction)) {
      return "n/a";
    }
    const percent = fraction * 100;
    if (percent > 0 && percent < 1) {
      return "<1%";
    }
    return percent.toFixed(0) + "%";
  }

  function formatNumber(value, digits) {
    const number = Number(value);
    return Number.isFinite(number) ? number.toFixed(digits) : "n/a";
  }

  function formatBytes(bytes) {
    if (bytes < 1024) {
      return bytes + " B";
    }
    if (bytes < 1024 * 1024) {
      return (bytes / 1024).toFixed(0) + " KiB";
    }
    return (bytes / (1024 * 1024)).toFixed(1) + " MiB";
  }

  function setStatus(text) {
    elements.status.textContent = text;
  }

  function showError(text) {
    elements.error.textContent = text;
    elements.error.hidden = false;
  }

  function hideError() {
    elements.error.textContent = "";
    elements.error.hidden = true;
  }
})();
