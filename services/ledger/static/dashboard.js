// nightshift dashboard: live updates over server-sent events, the Stop / Resume buttons,
// and the token form of a ledger that guards reads. Ours, no library, nothing fetched
// from another origin.
"use strict";
(function () {
  var TOKEN_KEY = "nightshift_api_token";

  function liveFeed(root) {
    var name = root.dataset.campaign;
    var base = "/ui/campaigns/" + encodeURIComponent(name);
    var status = document.getElementById("live");
    var timer = null;
    var source = new EventSource(
      "/campaigns/" + encodeURIComponent(name) + "/events?after=" + root.dataset.position
    );
    function show(on, text) {
      if (!status) return;
      status.className = "live " + (on ? "on" : "off");
      status.textContent = text;
    }
    function refresh() {
      timer = null;
      var parts = root.querySelectorAll("[data-part]");
      Array.prototype.forEach.call(parts, function (el) {
        fetch(base + "/parts/" + el.dataset.part + window.location.search, { credentials: "same-origin" })
          .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
          .then(function (html) { el.innerHTML = html; })
          .catch(function (why) { show(false, "refresh failed (" + why + ")"); });
      });
    }
    source.onopen = function () { show(true, "live"); };
    source.onerror = function () { show(false, "reconnecting…"); };
    source.addEventListener("update", function (e) {
      var data = JSON.parse(e.data);
      root.dataset.position = data.position;
      root.dataset.updates = String(Number(root.dataset.updates || 0) + 1);
      if (timer === null) timer = window.setTimeout(refresh, 250);
    });
    source.addEventListener("result", function (e) {
      root.dataset.lastResult = JSON.parse(e.data).run_id;
    });
  }

  function controls(root) {
    var input = document.getElementById("token");
    var out = document.getElementById("control-msg");
    if (!input) return;
    input.value = window.sessionStorage.getItem(TOKEN_KEY) || "";
    Array.prototype.forEach.call(root.querySelectorAll("button[data-action]"), function (button) {
      button.addEventListener("click", function () {
        var token = input.value.trim();
        window.sessionStorage.setItem(TOKEN_KEY, token);
        var url = "/campaigns/" + encodeURIComponent(root.dataset.campaign) + "/" + button.dataset.action;
        out.textContent = button.dataset.action + "…";
        fetch(url, { method: "POST", headers: token ? { Authorization: "Bearer " + token } : {} })
          .then(function (r) { return r.json().then(function (body) { return [r.status, body]; }); })
          .then(function (res) {
            out.textContent = res[0] === 200 ? res[1].detail : res[0] + ": " + res[1].detail;
            out.className = res[0] === 200 ? "muted" : "crash";
          })
          .catch(function (why) { out.textContent = "failed: " + why; out.className = "crash"; });
      });
    });
  }

  function tokenForm() {
    var form = document.getElementById("token-form");
    if (!form) return;
    form.addEventListener("submit", function (e) {
      e.preventDefault();
      var value = document.getElementById("read-token").value.trim();
      document.cookie = "nightshift_token=" + encodeURIComponent(value) + "; path=/; SameSite=Strict";
      window.location.reload();
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var root = document.getElementById("campaign");
    if (root) {
      liveFeed(root);
      controls(root);
    }
    tokenForm();
  });
})();
