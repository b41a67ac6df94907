// Review page: move through the slices (slider, mouse wheel, arrow keys, Page Up/Down), pick a window.
// The server draws every contour (web/overlay.py); this only changes which slice image is shown.
(function () {
  const v = document.getElementById("viewer");
  if (!v) return;
  const job = v.dataset.job, nz = +v.dataset.nz;
  const positions = JSON.parse(v.dataset.positions), confidence = JSON.parse(v.dataset.confidence);
  const prompts = JSON.parse(v.dataset.prompts), uncertain = new Set(JSON.parse(v.dataset.uncertain));
  const contours = new Set(JSON.parse(v.dataset.contours)), hasConf = v.dataset.hasConfidence === "1";
  const img = document.getElementById("slice-img"), slider = document.getElementById("slider");
  const label = document.getElementById("slice-label"), cursor = document.getElementById("strip-cursor");
  let z = +v.dataset.start, win = v.dataset.window;
  const cache = new Map();
  const url = (k) => `/jobs/${job}/slices/${k}.png?window=${win}`;
  function preload(k) {
    if (k < 0 || k >= nz || cache.has(url(k))) return;
    const i = new Image(); i.src = url(k); cache.set(url(k), i);
    if (cache.size > 64) cache.delete(cache.keys().next().value);
  }
  function show(k) {
    z = Math.max(0, Math.min(nz - 1, k));
    img.src = url(z); img.dataset.slice = z; slider.value = z; cursor.setAttribute("x", z);
    let text = `Slice ${z + 1} / ${nz} · ${positions[z].toFixed(1)} mm`;
    if (contours.has(z)) text += hasConf ? ` · confidence ${confidence[z].toFixed(2)}` : " · contoured";
    else text += " · no contour";
    label.innerHTML = text + (prompts.includes(z) ? ' · <span class="prompt">PROMPT SLICE</span>' : "")
      + (uncertain.has(z) ? ' · <span class="uncertain">UNCERTAIN</span>' : "");
    label.dataset.slice = z;
    preload(z + 1); preload(z - 1);
  }
  slider.addEventListener("input", () => show(+slider.value));
  img.addEventListener("wheel", (e) => { e.preventDefault(); show(z + (e.deltaY > 0 ? 1 : -1)); }, { passive: false });
  document.addEventListener("keydown", (e) => {
    if (e.target.closest && e.target.closest("textarea, input:not([type=range]), select")) return;
    const step = { ArrowUp: 1, ArrowRight: 1, ArrowDown: -1, ArrowLeft: -1, PageUp: 10, PageDown: -10 }[e.key];
    if (step !== undefined) { e.preventDefault(); show(z + step); }
  });
  for (const b of v.querySelectorAll("button[data-window]")) {
    b.addEventListener("click", () => {
      win = b.dataset.window; cache.clear();
      v.querySelectorAll("button[data-window]").forEach((o) => o.classList.toggle("active", o === b));
      show(z);
    });
    b.classList.toggle("active", b.dataset.window === win);
  }
  document.getElementById("goto-prompt").addEventListener("click", () => { if (prompts.length) show(prompts[0]); });
  show(z);
})();
