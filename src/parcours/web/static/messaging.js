/* Secure messaging, live: a small websocket client with reconnection, catch-up and de-duplication.
 *
 * The pages work without this file (forms post and reload). With it:
 * - a conversation page receives new messages as they are sent (from every tab and device of every
 *   participant, whichever server process they reach), in order, each once (de-duplicated by id);
 * - after a lost connection it reconnects (backoff with jitter) and asks for everything after the
 *   highest message number up to which it has everything (the cursor), so nothing is missed;
 * - read receipts update live; the messages of others are marked read while the page is visible;
 * - replies are posted with htmx without a page load; the inbox refreshes its list when something arrives.
 */
(function () {
  "use strict";

  var root = document.querySelector(".messaging[data-ws]");
  if (!root || !window.WebSocket) { return; }

  var conversation = root.getAttribute("data-conversation");
  var list = document.getElementById("messages");
  var status = document.getElementById("live-status");
  var announcer = document.getElementById("new-messages");
  var cursor = parseInt(root.getAttribute("data-cursor") || "0", 10);
  var have = {};  // message numbers received beyond the cursor
  var names = parseJson(root.getAttribute("data-names"), {});
  var me = parseJson(root.getAttribute("data-me"), []);
  var marks = parseJson(root.getAttribute("data-marks"), {});
  var readBy = root.getAttribute("data-read-by") || "{who}";
  var texts = {
    connected: root.getAttribute("data-live-connected") || "",
    reconnecting: root.getAttribute("data-live-reconnecting") || "",
    fresh: root.getAttribute("data-live-new") || "{who}"
  };
  var socket = null;
  var attempts = 0;
  var pingTimer = null;
  var refreshTimer = null;
  var lastReadSent = 0;

  function parseJson(text, fallback) {
    try { return text ? JSON.parse(text) : fallback; } catch (e) { return fallback; }
  }

  function csrf() {
    var headers = parseJson(document.body.getAttribute("hx-headers"), {});
    return headers["X-CSRF-Token"] || "";
  }

  function say(text) { if (status) { status.textContent = text; } }

  // -- messages ---------------------------------------------------------------------------------
  function advance(seq) {
    if (seq > cursor) { have[seq] = true; }
    while (have[cursor + 1]) { delete have[cursor + 1]; cursor += 1; }
  }

  function insert(html, id, seq) {
    if (!list || document.getElementById("msg-" + id)) { return false; }  // delivered twice: once is enough
    var holder = document.createElement("ol");
    holder.innerHTML = html;
    var item = holder.firstElementChild;
    if (!item) { return false; }
    item.querySelectorAll("input[name=csrf_token]").forEach(function (input) { input.value = csrf(); });
    var after = null;
    var items = list.children;
    for (var i = items.length - 1; i >= 0; i--) {
      if (parseInt(items[i].getAttribute("data-seq") || "0", 10) < seq) { after = items[i]; break; }
    }
    if (after) { after.insertAdjacentElement("afterend", item); } else { list.insertBefore(item, list.firstChild); }
    return true;
  }

  function receipts() {
    if (!list) { return; }
    list.querySelectorAll("li.mine").forEach(function (item) {
      var seq = parseInt(item.getAttribute("data-seq") || "0", 10);
      var sender = item.getAttribute("data-sender");
      var readers = [];
      Object.keys(marks).forEach(function (who) {
        if (me.indexOf(who) < 0 && who !== sender && marks[who] >= seq) { readers.push(names[who] || who); }
      });
      var span = item.querySelector(".receipt");
      if (span) { span.textContent = readers.length ? readBy.replace("{who}", readers.join(", ")) : ""; }
    });
  }

  function markRead() {
    if (!conversation || document.visibilityState !== "visible" || cursor <= lastReadSent) { return; }
    if (send({type: "read", conversation: conversation, seq: cursor})) { lastReadSent = cursor; }
  }

  function onMessage(event) {
    if (event.conversation !== conversation) { refreshInbox(); return; }
    var added = event.html ? insert(event.html, event.id, event.seq) : false;
    advance(event.seq);
    if (added && !event.mine && announcer) {
      announcer.textContent = texts.fresh.replace("{who}", event.sender_name || "");
    }
    receipts();
    markRead();
  }

  function refreshInbox() {
    var url = root.getAttribute("data-inbox");
    var box = document.getElementById("conversations");
    if (!url || !box) { return; }
    clearTimeout(refreshTimer);
    refreshTimer = setTimeout(function () {
      fetch(url, {credentials: "same-origin", headers: {"HX-Request": "true"}})
        .then(function (r) { return r.ok ? r.text() : null; })
        .then(function (html) {
          if (!html) { return; }
          var holder = document.createElement("div");
          holder.innerHTML = html;
          var fresh = holder.querySelector("#conversations");
          if (fresh) { box.replaceWith(fresh); }
        })
        .catch(function () { /* the next event or reconnection refreshes again */ });
    }, 250);
  }

  // -- the socket -------------------------------------------------------------------------------
  function send(obj) {
    if (socket && socket.readyState === WebSocket.OPEN) { socket.send(JSON.stringify(obj)); return true; }
    return false;
  }

  function hello() {
    var cursors = {};
    if (conversation) { cursors[conversation] = cursor; }
    send({type: "hello", cursors: cursors, html: true});
  }

  function connect() {
    var url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + root.getAttribute("data-ws");
    socket = new WebSocket(url);
    socket.onopen = function () {
      attempts = 0;
      hello();
      clearInterval(pingTimer);
      pingTimer = setInterval(function () { send({type: "ping"}); }, 25000);
    };
    socket.onmessage = function (e) {
      var event = parseJson(e.data, null);
      if (!event) { return; }
      if (event.type === "message") { onMessage(event); }
      else if (event.type === "gap" && event.conversation === conversation) { advance(event.seq); markRead(); }
      else if (event.type === "read") {
        if (event.conversation === conversation) { marks[event.participant] = Math.max(marks[event.participant] || 0, event.seq); receipts(); }
        else { refreshInbox(); }
      }
      else if (event.type === "conversation") { refreshInbox(); }
      else if (event.type === "resync") {
        if (event.conversation && event.conversation === conversation) { location.reload(); } else { hello(); }
      }
      else if (event.type === "ready") { say(texts.connected); root.setAttribute("data-live", "ready"); markRead(); refreshInbox(); }
    };
    socket.onclose = function () {
      clearInterval(pingTimer);
      root.setAttribute("data-live", "closed");
      say(texts.reconnecting);
      attempts += 1;
      var delay = Math.min(10000, 500 * Math.pow(2, Math.min(attempts, 5))) * (0.5 + Math.random());
      setTimeout(connect, delay);
    };
  }

  // -- replies ------------------------------------------------------------------------------------
  var form = document.getElementById("reply");
  var replyTo = document.getElementById("in-reply-to");
  var replying = document.getElementById("replying");
  var replyingText = document.getElementById("replying-text");
  var sendError = document.getElementById("send-error");

  function setReply(id) {
    if (!replyTo || !replying) { return; }
    replyTo.value = id || "";
    replying.hidden = !id;
    if (id) {
      var who = document.querySelector("#msg-" + CSS.escape(id) + " .message-who");
      replyingText.textContent = (root.getAttribute("data-replying") || "{who}").replace("{who}", who ? who.textContent : "");
      document.getElementById("msg-text").focus();
    }
  }

  document.addEventListener("click", function (e) {
    var button = e.target.closest ? e.target.closest("[data-reply-to]") : null;
    if (button) { setReply(button.getAttribute("data-reply-to")); }
    if (e.target.id === "cancel-reply") { setReply(""); }
  });

  if (form) {
    form.addEventListener("htmx:afterRequest", function (e) {
      var xhr = e.detail.xhr;
      if (e.detail.successful) {
        var holder = document.createElement("ol");
        holder.innerHTML = xhr.responseText;
        var item = holder.firstElementChild;
        if (item) { insert(xhr.responseText, item.getAttribute("data-id"), parseInt(item.getAttribute("data-seq") || "0", 10)); }
        form.reset();
        setReply("");
        if (sendError) { sendError.hidden = true; }
        receipts();
      } else if (sendError) {
        sendError.textContent = xhr.responseText || xhr.statusText;
        sendError.hidden = false;
      }
    });
  }

  document.addEventListener("visibilitychange", markRead);
  receipts();
  connect();
})();
