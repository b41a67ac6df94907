// Review page (web/review.py): the slice with the contours of the result's newest revision, zoom and pan,
// window/level, sagittal and coronal reconstructions through the cursor, and corrections per structure
// (clicks, box, brush / eraser outline, first / last slice) sent to the JSON API (web/api.py).
// Slice images are windowed PNGs from the server; contours are polygons from the RTSTRUCT drawn here as SVG.
// Coordinates sent are voxel indices: slice z from 0, x the column, y the row (as `rtprop propagate`).
(function () {
  "use strict";
  const v = document.getElementById("viewer");
  if (!v) return;
  const $ = (id) => document.getElementById(id);
  const SVGNS = "http://www.w3.org/2000/svg";
  const job = v.dataset.job, nz = +v.dataset.nz, ny = +v.dataset.ny, nx = +v.dataset.nx;
  const [sx, sy] = JSON.parse(v.dataset.spacing); // mm between columns, between rows
  const positions = JSON.parse(v.dataset.positions), prompts = JSON.parse(v.dataset.prompts);
  const presets = JSON.parse(v.dataset.presets), threshold = +v.dataset.threshold;
  const hasConfidence = v.dataset.hasConfidence === "1", canCorrect = v.dataset.canCorrect === "1";
  const superiorLast = v.dataset.superiorLast === "1", csrf = v.dataset.csrf;
  const sourceColour = v.dataset.sourceColour;
  const pane = $("axial-pane"), stage = $("stage"), img = $("slice-img"), paint = $("paint");
  const layers = { sources: $("sources-layer"), contours: $("contours-layer"), marks: $("marks-layer"),
                   cursor: $("cursor-layer") };
  const slider = $("slider"), label = $("slice-label"), statusLine = $("status"), strip = $("strip");
  const busy = $("busy"), select = $("roi-select"), readout = $("pixel-readout");

  let z = +v.dataset.start, level = +v.dataset.level, width = +v.dataset.width;
  let state = null, revision = +v.dataset.revision, roiIndex = 0, tool = "browse";
  let zoom = 1, panX = 0, panY = 0, fitScale = 1;
  const cursor = { x: nx >> 1, y: ny >> 1 };
  let sending = false;

  // ------------------------------------------------------------------ small helpers
  const clamp = (a, lo, hi) => Math.max(lo, Math.min(hi, a));
  function el(tag, attrs, text) {
    const e = document.createElementNS(SVGNS, tag);
    for (const [k, val] of Object.entries(attrs || {})) e.setAttribute(k, val);
    if (text) e.textContent = text;
    return e;
  }
  function html(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function say(text, kind) { statusLine.textContent = text; statusLine.className = "status " + (kind || ""); }
  const roi = () => (state ? state.rois[roiIndex] : null);
  const frame = () => new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve)));

  // ------------------------------------------------------------------ layout: fit, zoom, pan
  function layout() {
    const w = pane.clientWidth, h = pane.clientHeight;
    fitScale = Math.min(w / (nx * sx), h / (ny * sy));
    const dw = nx * sx * fitScale * zoom, dh = ny * sy * fitScale * zoom;
    stage.style.width = dw + "px";
    stage.style.height = dh + "px";
    stage.style.transform = `translate(${(w - dw) / 2 + panX}px, ${(h - dh) / 2 + panY}px)`;
    layoutPlanes();
  }
  function zoomAt(factor, clientX, clientY) {
    const r = stage.getBoundingClientRect(), p = pane.getBoundingClientRect();
    const fx = (clientX - r.left) / r.width, fy = (clientY - r.top) / r.height;
    zoom = clamp(zoom * factor, 0.5, 16);
    const dw = nx * sx * fitScale * zoom, dh = ny * sy * fitScale * zoom;
    panX = clientX - p.left - fx * dw - (p.width - dw) / 2;
    panY = clientY - p.top - fy * dh - (p.height - dh) / 2;
    layout();
  }
  function fit() { zoom = 1; panX = panY = 0; layout(); }
  function voxelAt(e) { // continuous (column, row) index under the pointer; voxel c covers [c - 0.5, c + 0.5]
    const r = stage.getBoundingClientRect();
    return { u: (e.clientX - r.left) / r.width * nx - 0.5, v: (e.clientY - r.top) / r.height * ny - 0.5 };
  }

  // ------------------------------------------------------------------ images
  const sliceUrl = (k) => `/jobs/${job}/slices/${k}.png?level=${Math.round(level)}&width=${Math.round(width)}`;
  const preloaded = new Map();
  function preload(k) {
    if (k < 0 || k >= nz || preloaded.has(sliceUrl(k))) return;
    const i = new Image(); i.src = sliceUrl(k); preloaded.set(sliceUrl(k), i);
    if (preloaded.size > 48) preloaded.delete(preloaded.keys().next().value);
  }
  let wlFrame = 0;
  function refreshImages() {
    if (wlFrame) return;
    wlFrame = requestAnimationFrame(() => {
      wlFrame = 0;
      img.src = sliceUrl(z);
      updatePlanes();
      $("wl-readout").textContent = `L ${Math.round(level)} W ${Math.round(width)}`;
    });
  }

  // sagittal (through column cursor.x) and coronal (through row cursor.y) reconstructions
  const planes = ["sagittal", "coronal"].map((name) => {
    const fig = $(`${name}-pane`);
    return { name, fig, img: $(`${name}-img`), marks: $(`${name}-marks`), where: $(`${name}-where`),
             h: +fig.dataset.height, w: +fig.dataset.width, wanted: "", loading: false };
  });
  function layoutPlanes() {
    const side = document.querySelector(".side-views");
    const availW = side.clientWidth, availH = (pane.clientHeight - 48) / 2;
    for (const p of planes) {
      const s = Math.min(availW / p.w, availH / p.h);
      for (const e of [p.img, p.marks]) { e.style.width = p.w * s + "px"; e.style.height = p.h * s + "px"; }
    }
  }
  function planeUrl(p) {
    const index = p.name === "sagittal" ? cursor.x : cursor.y;
    return `/jobs/${job}/planes/${p.name}/${index}.png?level=${Math.round(level)}&width=${Math.round(width)}&r=${revision}`;
  }
  function updatePlanes() {
    for (const p of planes) {
      p.wanted = planeUrl(p);
      if (!p.loading && p.img.getAttribute("src") !== p.wanted) { p.loading = true; p.img.src = p.wanted; }
      drawPlaneMarks(p);
    }
  }
  for (const p of planes) {
    const next = () => { p.loading = false; if (p.img.getAttribute("src") !== p.wanted) updatePlanes(); };
    p.img.addEventListener("load", next);
    p.img.addEventListener("error", next);
    p.img.addEventListener("click", (e) => {
      const r = p.img.getBoundingClientRect();
      const fx = (e.clientX - r.left) / r.width, fy = (e.clientY - r.top) / r.height;
      const k = clamp(Math.floor(fy * nz), 0, nz - 1);
      if (p.name === "sagittal") cursor.y = clamp(Math.floor(fx * ny), 0, ny - 1);
      else cursor.x = clamp(Math.floor(fx * nx), 0, nx - 1);
      show(superiorLast ? nz - 1 - k : k);
    });
  }
  function drawPlaneMarks(p) {
    p.marks.replaceChildren();
    const row = ((superiorLast ? nz - 1 - z : z) + 0.5) * p.h / nz;
    const across = p.name === "sagittal" ? cursor.y + 0.5 : cursor.x + 0.5;
    p.marks.append(el("line", { x1: 0, x2: p.w, y1: row, y2: row, class: "slice-line" }),
                   el("line", { x1: across, x2: across, y1: 0, y2: p.h, class: "cursor-line" }));
    p.where.textContent = p.name === "sagittal" ? `column x ${cursor.x}` : `row y ${cursor.y}`;
  }

  // ------------------------------------------------------------------ drawing the revision on screen
  function polygon(points, attrs) {
    return el("polygon", { points: points.map((p) => `${p[0]},${p[1]}`).join(" "), ...attrs });
  }
  function drawContours() {
    layers.contours.replaceChildren();
    layers.sources.replaceChildren();
    if (!state) return;
    for (const s of state.sources) {
      for (const pts of s.contours[z] || []) layers.sources.append(polygon(pts, { stroke: sourceColour, class: "source" }));
    }
    state.rois.forEach((r, i) => {
      for (const pts of r.contours[z] || []) {
        layers.contours.append(polygon(pts, { stroke: r.colour, class: i === roiIndex ? "contour selected" : "contour",
                                              "data-roi": r.name }));
      }
    });
    layers.contours.dataset.slice = z;
    layers.contours.dataset.revision = revision;
    drawMarks();
  }
  function drawMarks() { // the selected structure's corrections in force on this slice
    layers.marks.replaceChildren();
    const r = roi();
    if (!r) return;
    for (const c of r.items) {
      if (c.slice !== z) continue;
      if (c.kind === "point") {
        layers.marks.append(el("circle", { cx: c.x, cy: c.y, r: 1.6, class: c.positive ? "mark positive" : "mark negative" }));
      } else if (c.kind === "box") {
        layers.marks.append(el("rect", { x: c.x0, y: c.y0, width: c.x1 - c.x0, height: c.y1 - c.y0, class: "mark box" }));
      } else if (c.kind === "outline") {
        layers.marks.append(polygon(c.points, { class: "mark outline" }));
      }
    }
  }
  function drawCursor() {
    layers.cursor.replaceChildren(
      el("line", { x1: cursor.x, x2: cursor.x, y1: -0.5, y2: ny - 0.5, class: "cursor-line" }),
      el("line", { x1: -0.5, x2: nx - 0.5, y1: cursor.y, y2: cursor.y, class: "cursor-line" }));
  }
  function drawStrip() {
    strip.replaceChildren();
    const r = roi();
    const contoured = new Set(r ? Object.keys(r.contours).map(Number) : []);
    for (let k = 0; k < nz; k++) {
      const c = r ? r.confidence[k] : 0;
      const fill = !contoured.has(k) ? "#333" : !hasConfidence && r.revision === 0 ? "#777"
        : `hsl(${Math.round(c * 120)},70%,45%)`;
      const rect = el("rect", { x: k, y: 3, width: 1, height: 9, fill, "data-slice": k });
      rect.append(el("title", {}, `slice ${k}: ` + (contoured.has(k) ? `confidence ${c.toFixed(2)}` : "no contour")));
      strip.append(rect);
    }
    for (const k of r ? r.uncertain : []) {
      strip.append(el("rect", { x: k, y: 0, width: 1, height: 3, class: "uncertain", fill: "#ff3030" }));
    }
    for (const k of prompts) {
      strip.append(el("rect", { x: k, y: 0, width: 1, height: 12, class: "prompt-mark", fill: "#40a0ff", opacity: 0.9 }));
    }
    strip.append(el("rect", { id: "strip-cursor", x: z, y: 0, width: 1, height: 12, fill: "none", stroke: "#fff",
                              "stroke-width": 0.3 }));
  }
  function drawLabel() {
    const r = roi();
    label.replaceChildren();
    let text = `Slice ${z} (0–${nz - 1}) · ${positions[z].toFixed(1)} mm`;
    const on = r && r.contours[z];
    const known = hasConfidence || (r && r.revision);
    if (r) text += ` · ${r.name}: ` + (!on ? "no contour" : known ? `confidence ${r.confidence[z].toFixed(2)}` : "contoured");
    label.append(text);
    if (prompts.includes(z)) label.append(" · ", html("span", "prompt", "PROMPT SLICE"));
    if (r && r.uncertain.includes(z)) label.append(" · ", html("span", "uncertain", "UNCERTAIN"));
    label.dataset.slice = z;
  }
  function drawSide() {
    for (const r of state.rois) {
      const card = document.querySelector(`section.roi[data-roi="${CSS.escape(r.name)}"]`);
      if (!card) continue;
      card.classList.toggle("selected", r === roi());
      const slices = r.slices ? `slices ${r.slices[0]}–${r.slices[1]}` : "no contour";
      card.querySelector("[data-field=summary]").textContent =
        `${slices} · ` + (r.structure_confidence === null ? `mean slice confidence ${r.mean_confidence.toFixed(2)}`
          : `confidence ${r.structure_confidence.toFixed(2)}`) + ` · ${r.corrections.length} correction` +
        (r.corrections.length === 1 ? "" : "s") + (r.revision ? ` · revision ${r.revision}` : "");
      card.querySelector("[data-field=warnings]").replaceChildren(...r.warnings.map((w) => html("li", "bad", w)));
      card.querySelector("[data-field=corrections]").replaceChildren(...r.corrections.map((c) => html("li", "", c)));
    }
    $("history").replaceChildren(...state.history.slice().reverse().map((h) =>
      html("li", "", `r${h.revision} · ${h.user} · ${h.roi}: ${h.what} · ${h.at.replace("T", " ").slice(0, 19)}`)));
    if (!state.history.length) $("history").append(html("li", "none", "none yet: revision 0 is the result as propagated"));
    $("revision-number").textContent = state.revision;
    $("revision-by").textContent = state.revision ? `by ${state.by} · ${state.corrections} correction` +
      (state.corrections === 1 ? "" : "s") + " in force" : "(as propagated)";
    for (const f of document.querySelectorAll(".revision-field")) f.value = state.revision;
    for (const f of document.querySelectorAll(".revision-ref")) f.textContent = state.revision;
    const closed = !canCorrect || !roi() || roi().decision !== null;
    for (const b of document.querySelectorAll(".tools button, .tools input")) b.disabled = closed || sending;
    const undo = $("undo");
    if (undo) undo.disabled = closed || sending || !roi().can_undo;
  }
  function draw() { drawContours(); drawCursor(); drawStrip(); drawLabel(); drawSide(); }

  async function load() {
    const res = await fetch(`/jobs/${job}/review/state.json`, { credentials: "same-origin", cache: "no-store" });
    if (!res.ok) { say(`could not load the contours (HTTP ${res.status})`, "error"); return; }
    state = await res.json();
    revision = state.revision;
    v.dataset.revision = revision;
    roiIndex = clamp(roiIndex, 0, state.rois.length - 1);
    draw();
    updatePlanes();
  }

  function show(k) {
    z = clamp(k, 0, nz - 1);
    img.src = sliceUrl(z);
    slider.value = z;
    if (paint && !paint.hidden) paint.hidden = true;
    drawContours();
    drawLabel();
    const c = $("strip-cursor");
    if (c) c.setAttribute("x", z);
    for (const p of planes) drawPlaneMarks(p);
    preload(z + 1); preload(z - 1);
  }

  // ------------------------------------------------------------------ corrections
  async function send(path, body, startedAt) {
    const r = roi();
    if (!r || sending) return;
    sending = true;
    busy.hidden = false;
    drawSide();
    const t0 = startedAt || performance.now();
    try {
      let res, data;
      try {
        res = await fetch(`/api/v1/jobs/${job}/${path}`, {
          method: "POST", credentials: "same-origin",
          headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
          body: JSON.stringify({ roi: r.name, revision, ...body }) });
        data = await res.json().catch(() => ({ error: `HTTP ${res.status}` }));
      } catch (err) {
        say(`not sent: ${err}`, "error");
        return;
      }
      const posted = performance.now();
      if (res.status === 201) {
        await load();
        await frame();
        const shown = performance.now();
        v.dataset.lastPostMs = Math.round(posted - t0);
        v.dataset.lastShownMs = Math.round(shown - t0);
        v.dataset.shownRevision = revision;
        const span = data.slices ? `slices ${data.slices[0]}–${data.slices[1]}` : "no contour";
        say(`Revision ${data.revision}: ${data.roi} ${span}, mean confidence ${data.confidence.toFixed(2)} ` +
            `(${((shown - t0) / 1000).toFixed(1)} s)`, "ok");
      } else if (res.status === 409 && data.revision !== undefined) {
        await load();
        say(`Not applied: ${data.error}. Showing revision ${revision} now.`, "warn");
      } else {
        say(`Refused: ${data.error || "HTTP " + res.status}`, "error");
      }
    } finally {
      sending = false;
      busy.hidden = true;
      if (state) drawSide();
    }
  }
  function sendPoint(a, positive, t0) {
    send("corrections", { kind: "point", slice: z, x: clamp(Math.round(a.u), 0, nx - 1),
                          y: clamp(Math.round(a.v), 0, ny - 1), positive }, t0);
  }
  function sendExtent(which) {
    const r = roi();
    if (!r) return;
    const [first, last] = r.slices || [z, z];
    const extent = which === "first" ? { first: z, last: Math.max(z, last) } : { first: Math.min(z, first), last: z };
    send("corrections", { kind: "extent", ...extent });
  }

  // brush and eraser: the structure's outline on this slice painted on a canvas of one pixel per voxel,
  // then its largest region's boundary (through pixel centres) sent as the outline
  const pen = paint.getContext("2d", { willReadFrequently: true });
  function startPaint() {
    const r = roi();
    pen.globalCompositeOperation = "source-over";
    pen.clearRect(0, 0, nx, ny);
    pen.fillStyle = r.colour;
    const region = new Path2D();
    for (const pts of r.contours[z] || []) {
      pts.forEach((p, i) => (i ? region.lineTo(p[0] + 0.5, p[1] + 0.5) : region.moveTo(p[0] + 0.5, p[1] + 0.5)));
      region.closePath();
    }
    pen.fill(region, "evenodd");
    paint.hidden = false;
  }
  function dab(a, b, erase) {
    const radius = +$("brush-size").value;
    pen.globalCompositeOperation = erase ? "destination-out" : "source-over";
    pen.strokeStyle = pen.fillStyle = roi().colour;
    pen.lineWidth = 2 * radius;
    pen.lineCap = "round";
    pen.beginPath();
    pen.moveTo(a.u + 0.5, a.v + 0.5);
    pen.lineTo(b.u + 0.5, b.v + 0.5);
    pen.stroke();
  }
  function paintedOutline() {
    const alpha = pen.getImageData(0, 0, nx, ny).data;
    const on = new Uint8Array(nx * ny);
    for (let i = 0; i < on.length; i++) on[i] = alpha[4 * i + 3] >= 128 ? 1 : 0;
    return trace(largestRegion(on, nx, ny), nx, ny);
  }
  function largestRegion(on, w, h) {
    const label = new Int32Array(w * h), stack = [];
    let best = 0, bestSize = 0, n = 0;
    for (let i = 0; i < w * h; i++) {
      if (!on[i] || label[i]) continue;
      n += 1; label[i] = n; stack.push(i);
      let size = 0;
      while (stack.length) {
        const j = stack.pop(); size += 1;
        const x = j % w, y = (j - x) / w;
        for (const k of [x > 0 ? j - 1 : -1, x < w - 1 ? j + 1 : -1, y > 0 ? j - w : -1, y < h - 1 ? j + w : -1]) {
          if (k >= 0 && on[k] && !label[k]) { label[k] = n; stack.push(k); }
        }
      }
      if (size > bestSize) { best = n; bestSize = size; }
    }
    const out = new Uint8Array(w * h);
    for (let i = 0; i < w * h; i++) out[i] = label[i] === best && best ? 1 : 0;
    return out;
  }
  const RING = [[-1, 0], [-1, -1], [0, -1], [1, -1], [1, 0], [1, 1], [0, 1], [-1, 1]]; // clockwise from west
  function trace(region, w, h) { // Moore-neighbour boundary of one region, through pixel centres
    const start = region.indexOf(1);
    if (start < 0) return [];
    const sx0 = start % w, sy0 = (start - sx0) / w;
    const inside = (x, y) => x >= 0 && y >= 0 && x < w && y < h && region[y * w + x] === 1;
    const step = (p) => {
      for (let i = 1; i <= 8; i++) {
        const d = (p.back + i) % 8, x = p.x + RING[d][0], y = p.y + RING[d][1];
        if (inside(x, y)) {
          const b = (d + 7) % 8, bx = p.x + RING[b][0] - x, by = p.y + RING[b][1] - y;
          return { x, y, back: RING.findIndex((r) => r[0] === bx && r[1] === by) };
        }
      }
      return null;
    };
    const first = step({ x: sx0, y: sy0, back: 0 });
    if (!first) return [[sx0 - 0.4, sy0 - 0.4], [sx0 + 0.4, sy0 - 0.4], [sx0 + 0.4, sy0 + 0.4], [sx0 - 0.4, sy0 + 0.4]];
    const pts = [[sx0, sy0]];
    let p = first;
    for (let guard = 0; guard < 4 * w * h; guard++) {
      if (p.x === sx0 && p.y === sy0) {
        const next = step(p);
        if (next.x === first.x && next.y === first.y) break;
      }
      pts.push([p.x, p.y]);
      p = step(p);
    }
    const kept = pts.filter((q, i) => { // drop points on a straight run
      const a = pts[(i + pts.length - 1) % pts.length], b = pts[(i + 1) % pts.length];
      return (q[0] - a[0]) * (b[1] - q[1]) !== (q[1] - a[1]) * (b[0] - q[0]) || (q[0] - a[0]) * (b[0] - q[0]) < 0
        || (q[1] - a[1]) * (b[1] - q[1]) < 0;
    });
    return kept.length >= 3 ? kept : pts;
  }

  // ------------------------------------------------------------------ pointer, wheel, keys
  let drag = null;
  pane.addEventListener("contextmenu", (e) => e.preventDefault());
  pane.addEventListener("pointerdown", (e) => {
    pane.focus({ preventScroll: true });
    const a = voxelAt(e);
    const mode = e.button === 2 ? "wl" : e.button === 1 ? "browse" : tool;
    drag = { mode, x: e.clientX, y: e.clientY, a, last: a, level, width, panX, panY, moved: false, t: 0 };
    if ((mode === "brush" || mode === "eraser") && roi()) { startPaint(); dab(a, a, mode === "eraser"); }
    pane.setPointerCapture(e.pointerId);
    e.preventDefault();
  });
  pane.addEventListener("pointermove", (e) => {
    const a = voxelAt(e);
    const x = Math.round(a.u), y = Math.round(a.v);
    if (x >= 0 && y >= 0 && x < nx && y < ny) {
      readout.textContent = `x ${x} · y ${y} · slice ${z}`;
      if (!drag && (x !== cursor.x || y !== cursor.y)) { cursor.x = x; cursor.y = y; drawCursor(); updatePlanes(); }
    }
    if (!drag) return;
    const dx = e.clientX - drag.x, dy = e.clientY - drag.y;
    if (Math.abs(dx) + Math.abs(dy) > 4) drag.moved = true;
    if (drag.mode === "browse") { panX = drag.panX + dx; panY = drag.panY + dy; layout(); }
    else if (drag.mode === "wl") {
      width = Math.max(1, drag.width * Math.exp(dx / 200));
      level = drag.level + dy * drag.width / 400;
      for (const b of document.querySelectorAll("[data-preset]")) b.classList.remove("active");
      refreshImages();
    } else if (drag.mode === "box") {
      layers.marks.querySelector(".rubber")?.remove();
      const x0 = Math.min(drag.a.u, a.u), y0 = Math.min(drag.a.v, a.v);
      layers.marks.append(el("rect", { x: x0, y: y0, width: Math.abs(a.u - drag.a.u), height: Math.abs(a.v - drag.a.v),
                                       class: "mark box rubber" }));
    } else if ((drag.mode === "brush" || drag.mode === "eraser") && roi()) {
      dab(drag.last, a, drag.mode === "eraser");
      drag.last = a;
    }
  });
  pane.addEventListener("pointerup", (e) => {
    if (!drag) return;
    const d = drag, a = voxelAt(e), t0 = performance.now();
    drag = null;
    const correcting = ["positive", "negative", "box", "brush", "eraser"].includes(d.mode);
    if (!canCorrect || !roi() || roi().decision !== null || sending) {
      if (d.mode === "brush" || d.mode === "eraser") paint.hidden = true;
      if (correcting && sending) say("Wait: the last correction is still propagating.", "warn");
      else if (correcting && roi() && roi().decision) say(`${roi().name} is decided: a decision is final.`, "warn");
      return;
    }
    if ((d.mode === "positive" || d.mode === "negative") && !d.moved) sendPoint(a, d.mode === "positive", t0);
    else if (d.mode === "box") {
      layers.marks.querySelector(".rubber")?.remove();
      const x0 = clamp(Math.round(Math.min(d.a.u, a.u)), 0, nx - 1), x1 = clamp(Math.round(Math.max(d.a.u, a.u)), 0, nx - 1);
      const y0 = clamp(Math.round(Math.min(d.a.v, a.v)), 0, ny - 1), y1 = clamp(Math.round(Math.max(d.a.v, a.v)), 0, ny - 1);
      if (x1 > x0 && y1 > y0) send("corrections", { kind: "box", slice: z, x0, y0, x1, y1 }, t0);
      else say("Drag a box around the structure on this slice.", "warn");
    } else if (d.mode === "brush" || d.mode === "eraser") {
      const points = paintedOutline();
      if (points.length >= 3) send("corrections", { kind: "outline", slice: z, points }, t0).then(() => { paint.hidden = true; });
      else { paint.hidden = true; say("Nothing left on this slice: use a negative click, or First / Last slice here.", "warn"); }
    }
  });
  pane.addEventListener("wheel", (e) => {
    e.preventDefault();
    if (e.ctrlKey) zoomAt(e.deltaY < 0 ? 1.15 : 1 / 1.15, e.clientX, e.clientY);
    else show(z + (e.deltaY > 0 ? 1 : -1));
  }, { passive: false });
  strip.addEventListener("click", (e) => {
    const r = strip.getBoundingClientRect();
    show(Math.floor((e.clientX - r.left) / r.width * nz));
  });
  slider.addEventListener("input", () => show(+slider.value));

  function setTool(name) {
    tool = name;
    for (const b of document.querySelectorAll("[data-tool]")) b.classList.toggle("active", b.dataset.tool === name);
    pane.dataset.tool = name;
  }
  function setPreset(name) {
    if (!presets[name]) return;
    [level, width] = presets[name];
    for (const b of document.querySelectorAll("[data-preset]")) b.classList.toggle("active", b.dataset.preset === name);
    preloaded.clear();
    refreshImages();
  }
  function selectRoi(i) {
    roiIndex = (i + state.rois.length) % state.rois.length;
    select.value = state.rois[roiIndex].name;
    draw();
  }
  for (const b of document.querySelectorAll("[data-tool]")) b.addEventListener("click", () => setTool(b.dataset.tool));
  for (const b of document.querySelectorAll("[data-preset]")) b.addEventListener("click", () => setPreset(b.dataset.preset));
  select.addEventListener("change", () => selectRoi(state.rois.findIndex((r) => r.name === select.value)));
  const on = (id, f) => { const b = $(id); if (b) b.addEventListener("click", f); };
  on("zoom-in", () => { const r = pane.getBoundingClientRect(); zoomAt(1.25, r.left + r.width / 2, r.top + r.height / 2); });
  on("zoom-out", () => { const r = pane.getBoundingClientRect(); zoomAt(0.8, r.left + r.width / 2, r.top + r.height / 2); });
  on("zoom-fit", fit);
  on("goto-prompt", () => { if (prompts.length) show(prompts[0]); });
  on("first-here", () => sendExtent("first"));
  on("last-here", () => sendExtent("last"));
  on("undo", () => send("corrections/undo", {}));

  document.addEventListener("keydown", (e) => {
    if (e.target.closest && e.target.closest("textarea, input:not([type=range]), select")) return;
    const step = { ArrowUp: 1, ArrowRight: 1, ArrowDown: -1, ArrowLeft: -1, PageUp: 10, PageDown: -10 }[e.key];
    if (step !== undefined) { e.preventDefault(); show(z + step); return; }
    if ((e.ctrlKey || e.metaKey) && e.key.toLowerCase() === "z") {
      e.preventDefault();
      if (canCorrect) send("corrections/undo", {});
      return;
    }
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const key = e.key.toLowerCase();
    const tools = { b: "browse", p: "positive", n: "negative", x: "box", d: "brush", e: "eraser", w: "wl" };
    if (tools[key] && (canCorrect || key === "b" || key === "w")) setTool(tools[key]);
    else if (key === "home") { e.preventDefault(); if (prompts.length) show(prompts[0]); }
    else if (key === "f" && canCorrect) sendExtent("first");
    else if (key === "l" && canCorrect) sendExtent("last");
    else if (key === "u" && canCorrect) send("corrections/undo", {});
    else if (key === "s" && state) selectRoi(roiIndex + 1);
    else if (key === "+" || key === "=") $("zoom-in").click();
    else if (key === "-") $("zoom-out").click();
    else if (key === "0") fit();
    else if (/^[1-9]$/.test(key)) setPreset(Object.keys(presets)[+key - 1]);
  });

  new ResizeObserver(layout).observe(pane);
  setTool("browse");
  const first = Object.keys(presets).find((k) => presets[k][0] === level && presets[k][1] === width);
  if (first) setPreset(first);
  $("wl-readout").textContent = `L ${Math.round(level)} W ${Math.round(width)}`;
  layout();
  show(z);
  load();
})();
