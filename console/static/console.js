// Doppel console: progressive enhancement only; every form also works without this file.
(function () {
  "use strict";
  var csrf = document.body.getAttribute("data-csrf") || "";

  function post(url, body) {
    return fetch(url, {
      method: "POST", body: body, credentials: "same-origin",
      headers: { "X-CSRF-Token": csrf, "Accept": "application/json" }
    }).then(function (r) {
      return r.json().then(function (data) { data.status = r.status; return data; });
    });
  }

  // Rating buttons: record the rating without reloading, then show the card's rating rows.
  document.addEventListener("submit", function (e) {
    var form = e.target;
    if (!form.hasAttribute("data-async") || !window.fetch) return;
    e.preventDefault();
    var data = new FormData(form);
    if (e.submitter && e.submitter.name) data.append(e.submitter.name, e.submitter.value);
    post(form.action, data).then(function (res) {
      var card = form.closest("[data-reply]");
      if (res.status >= 400) { alertIn(card, res.error + (res.hint ? " " + res.hint : "")); return; }
      var list = card.querySelector(".rating-rows");
      list.textContent = "";
      res.ratings.forEach(function (r) {
        var li = document.createElement("li");
        li.className = "rating-row";
        li.setAttribute("data-rater", r.rater);
        li.textContent = r.mark + " " + r.rater + " " + r.ago;
        list.appendChild(li);
      });
      var mine = res.ratings.filter(function (r) { return r.rater === "console:owner"; })[0];
      form.querySelectorAll("button[name=value]").forEach(function (b) {
        b.classList.toggle("on", !!mine && String(mine.value) === b.value && b.value !== "0");
      });
    }).catch(function () { form.submit(); });
  });

  function alertIn(card, text) {
    var p = card.querySelector(".async-error") || document.createElement("p");
    p.className = "flash error async-error";
    p.textContent = text;
    card.appendChild(p);
  }

  // Retrain now: start it without leaving the page, then follow its progress.
  var box = document.getElementById("retrain");
  if (box && box.getAttribute("data-progress-url")) {
    var url = box.getAttribute("data-progress-url");
    var wasRunning = box.getAttribute("data-running") === "yes";
    var bar = document.getElementById("retrain-bar");
    var text = document.getElementById("retrain-text");
    var panel = document.getElementById("retrain-progress");
    var form = document.getElementById("retrain-form");
    var timer = null;

    var show = function (p) {
      if (!panel || !p || p.state === "idle" || p.state === "unavailable") return;
      panel.hidden = false;
      if (p.total) { bar.max = p.total; bar.value = p.step; } else { bar.removeAttribute("value"); }
      if (p.running) {
        text.textContent = p.kind + ": " + (p.phase || "working") +
          (p.total ? " — step " + p.step + " of " + p.total : "") +
          (p.loss !== null && p.loss !== undefined ? ", loss " + p.loss.toFixed(3) : "");
      } else {
        text.textContent = p.kind + " " + p.state + ": " + p.message;
      }
      text.className = "state-" + p.state;
      if (form) form.querySelector("button").disabled = !!p.running;
    };
    var poll = function () {
      fetch(url, { headers: { "Accept": "application/json" }, credentials: "same-origin" })
        .then(function (r) { return r.json(); })
        .then(function (p) {
          show(p);
          if (p.running) { wasRunning = true; timer = setTimeout(poll, 1500); }
          else if (wasRunning) { window.location.reload(); }  // the finished run shows in the table
        })
        .catch(function () { timer = setTimeout(poll, 5000); });
    };
    if (wasRunning) poll();
    if (form && window.fetch) {
      form.addEventListener("submit", function (e) {
        e.preventDefault();
        post(form.action, new FormData(form)).then(function (res) {
          if (res.progress) show(res.progress);
          if (res.status >= 400) {
            panel.hidden = false;
            text.textContent = res.message || res.error;
            text.className = "state-failed";
            return;
          }
          wasRunning = true;
          clearTimeout(timer);
          poll();
        });
      });
    }
  }

  // Playground: say that the twin is writing while the page waits for its reply.
  var composer = document.getElementById("composer");
  if (composer) {
    composer.addEventListener("submit", function () {
      var typing = composer.querySelector(".typing");
      if (typing) typing.hidden = false;
      composer.querySelector("button").disabled = true;
    });
    if (!window.location.hash) {
      var last = document.querySelector("#playground > :last-child");
      if (last) last.scrollIntoView({ block: "end" });
    }
  }
})();
