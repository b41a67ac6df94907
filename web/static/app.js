// Every page: what would otherwise be inline script or style, which the Content-Security-Policy forbids
// (web/security.py). Markup asks with data attributes; nothing here knows a page.
(function () {
  const csrf = document.querySelector('meta[name="csrf-token"]');
  if (csrf) {  // htmx requests of a logged-in page carry the session's CSRF token
    document.body.addEventListener("htmx:configRequest", (e) => { e.detail.headers["X-CSRF-Token"] = csrf.content; });
  }
  for (const el of document.querySelectorAll("[data-swatch]")) el.style.background = el.dataset.swatch;
  for (const el of document.querySelectorAll("select[data-autosubmit]")) {
    el.addEventListener("change", () => el.form.submit());
  }
})();
