// Tele-stroke: live alerts and timeline over /workspace/stroke/ws (fed by the change feed).
(function () {
  "use strict";
  var root = document.querySelector("[data-stroke-live]");
  if (!root) return;
  var current = root.getAttribute("data-stroke-request");
  var alerts = document.getElementById("stroke-alerts");
  var retry = 1000;

  function refreshPanel() {
    var panel = document.getElementById("stroke-panel");
    if (!panel || !current) return;
    fetch("/workspace/stroke/" + encodeURIComponent(current) + "?partial=1", {credentials: "same-origin"})
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (html === null) return;
        var doc = new DOMParser().parseFromString(html, "text/html");
        var fresh = doc.getElementById("stroke-panel");
        if (fresh) panel.replaceWith(fresh);
      });
  }

  function showAlert(msg) {
    if (!alerts) return;
    var id = "stroke-alert-" + msg.id;
    if (document.getElementById(id)) return;
    var box = document.createElement("div");
    box.id = id;
    box.className = "stroke-alert";
    box.setAttribute("role", "alert");
    var text = document.createElement("p");
    text.textContent = alerts.getAttribute("data-text");
    var link = document.createElement("a");
    link.href = "/workspace/stroke/" + encodeURIComponent(msg.id);
    link.textContent = alerts.getAttribute("data-link");
    box.appendChild(text);
    box.appendChild(link);
    alerts.appendChild(box);
  }

  function connect() {
    var ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/workspace/stroke/ws");
    ws.onopen = function () { retry = 1000; root.setAttribute("data-stroke-connected", "1"); };
    ws.onmessage = function (ev) {
      var msg = JSON.parse(ev.data);
      if (msg.type !== "stroke") return;
      if (msg.party === "specialist" && msg.status === "requested") showAlert(msg);
      if (msg.id === current) refreshPanel();
    };
    ws.onclose = function () {
      root.removeAttribute("data-stroke-connected");
      setTimeout(connect, retry);
      retry = Math.min(retry * 2, 30000);
    };
  }
  connect();
})();
