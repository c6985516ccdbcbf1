/* ptcompile site: typeset math with the vendored KaTeX and filter the paper index. Nothing is fetched. */
(function () {
  "use strict";

  // Every element of class ptc-math holds LaTeX as text (the compiler HTML-escaped it). KaTeX replaces it in
  // place; `trust: false` keeps \href, \url and \includegraphics from making links or loading anything, and
  // `throwOnError: false` shows a malformed formula in red instead of breaking the page.
  function typeset() {
    if (typeof katex === "undefined") return;
    document.querySelectorAll(".ptc-math:not([data-typeset])").forEach(function (el) {
      var tex = el.textContent;
      try {
        katex.render(tex, el, {
          displayMode: el.classList.contains("ptc-display"),
          throwOnError: false,
          trust: false,
          strict: "ignore",
          output: "htmlAndMathml"
        });
      } catch (err) {
        el.textContent = tex;
      }
      el.setAttribute("data-typeset", "");
    });
  }

  // The paper index: hide the entries that do not match the chosen category, year, venue and text. The
  // choice is mirrored in the address (?category=rlvr&year=2024), so a filtered view can be linked to.
  function filters() {
    var form = document.getElementById("ptc-paper-filters");
    if (!form) return;
    var papers = Array.prototype.slice.call(document.querySelectorAll(".ptc-paper"));
    var count = form.querySelector(".ptc-count");
    var texts = papers.map(function (el) { return el.textContent.toLowerCase(); });
    var params = new URLSearchParams(window.location.search);
    ["category", "year", "venue", "text"].forEach(function (name) {
      var value = params.get(name);
      if (value !== null && form.elements[name]) form.elements[name].value = value;
    });

    function apply() {
      var category = form.elements.category.value;
      var year = form.elements.year.value;
      var venue = form.elements.venue.value;
      var words = form.elements.text.value.toLowerCase().split(/\s+/).filter(Boolean);
      var shown = 0;
      papers.forEach(function (el, i) {
        var ok = (!category || (" " + el.getAttribute("data-category") + " ").indexOf(" " + category + " ") >= 0) &&
          (!year || el.getAttribute("data-year") === year) &&
          (!venue || el.getAttribute("data-venue") === venue) &&
          words.every(function (w) { return texts[i].indexOf(w) >= 0; });
        el.hidden = !ok;
        if (ok) shown += 1;
      });
      count.textContent = shown + " of " + papers.length + " papers";
      var query = new URLSearchParams();
      ["category", "year", "venue", "text"].forEach(function (name) {
        if (form.elements[name].value) query.set(name, form.elements[name].value);
      });
      var search = query.toString();
      window.history.replaceState(null, "", window.location.pathname + (search ? "?" + search : "") + window.location.hash);
    }

    form.addEventListener("input", apply);
    form.addEventListener("change", apply);
    form.addEventListener("submit", function (event) { event.preventDefault(); });
    form.addEventListener("reset", function () { window.setTimeout(apply, 0); });
    apply();
    // A link to papers/#key opens the entry even when the filters would hide it.
    if (window.location.hash) {
      var target = document.getElementById(decodeURIComponent(window.location.hash.slice(1)));
      var entry = target && target.closest(".ptc-paper");
      if (entry && entry.hidden) { form.reset(); apply(); target.scrollIntoView(); }
    }
  }

  function init() { typeset(); filters(); }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
