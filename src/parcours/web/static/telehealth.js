// Teleconsultation: device check, and the room (WebRTC mesh, signaling over the platform's websocket).
(function () {
  "use strict";

  function deviceCheck(box) {
    const status = document.getElementById("tele-check-status");
    document.getElementById("tele-check-start").addEventListener("click", async () => {
      try {
        const stream = await navigator.mediaDevices.getUserMedia({ video: true, audio: true });
        document.getElementById("tele-preview").srcObject = stream;
        const ctx = new AudioContext();
        const analyser = ctx.createAnalyser();
        ctx.createMediaStreamSource(stream).connect(analyser);
        const data = new Uint8Array(analyser.fftSize);
        const meter = document.getElementById("tele-level");
        setInterval(() => {
          analyser.getByteTimeDomainData(data);
          let peak = 0;
          for (const v of data) peak = Math.max(peak, Math.abs(v - 128) / 128);
          meter.value = peak;
        }, 200);
        status.textContent = box.dataset.ok;
      } catch (e) {
        status.textContent = box.dataset.failed;
      }
    });
  }

  function room(root) {
    const roomId = root.dataset.room;
    const host = root.dataset.host === "1";
    const T = root.dataset;
    const status = document.getElementById("tele-status");
    const videos = document.getElementById("tele-videos");
    const peers = new Map(); // peer id -> {pc, who, tile, pending, offerer}
    const attended = new Set();
    let peerId = sessionStorage.getItem("tele-peer-" + roomId);
    if (!peerId) {
      peerId = Array.from(crypto.getRandomValues(new Uint8Array(8)), (b) => b.toString(16).padStart(2, "0")).join("");
      sessionStorage.setItem("tele-peer-" + roomId, peerId);
    }
    let ws = null, local = null, iceServers = [], admitted = false, started = null, ended = false, backoff = 500;

    function say(text) { status.textContent = text; }
    function send(m) { if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(m)); }

    function connect() {
      const scheme = location.protocol === "https:" ? "wss://" : "ws://";
      ws = new WebSocket(scheme + location.host + "/telehealth/rooms/" + encodeURIComponent(roomId) + "/ws?peer=" + peerId);
      ws.onopen = () => { backoff = 500; };
      ws.onmessage = (e) => { handle(JSON.parse(e.data)).catch((err) => console.warn("telehealth", err)); };
      ws.onclose = () => {
        if (ended) return;
        say(T.reconnecting);
        setTimeout(connect, backoff);
        backoff = Math.min(backoff * 2, 8000);
      };
    }

    function tile(id, who) {
      const fig = document.createElement("figure");
      fig.className = "tele-tile";
      const v = document.createElement("video");
      v.autoplay = true; v.playsInline = true; v.setAttribute("aria-label", who);
      const cap = document.createElement("figcaption");
      const name = document.createElement("span"); name.textContent = who;
      const q = document.createElement("span"); q.className = "tele-quality"; q.textContent = T.connecting;
      cap.append(name, q); fig.append(v, cap); videos.append(fig);
      return fig;
    }

    function drop(id) {
      const p = peers.get(id);
      if (!p) return;
      p.pc.close(); p.tile.remove(); peers.delete(id);
    }

    function peer(id, who, offerer) {
      let p = peers.get(id);
      if (p) return p;
      const pc = new RTCPeerConnection({ iceServers: iceServers });
      p = { pc: pc, who: who, tile: tile(id, who), pending: [], offerer: offerer, restarting: null };
      peers.set(id, p);
      if (local) local.getTracks().forEach((track) => pc.addTrack(track, local));
      pc.onicecandidate = (e) => { if (e.candidate) send({ type: "ice", to: id, data: e.candidate.toJSON() }); };
      pc.ontrack = (e) => { const v = p.tile.querySelector("video"); if (v.srcObject !== e.streams[0]) v.srcObject = e.streams[0]; };
      pc.onconnectionstatechange = () => {
        if (pc.connectionState === "connected") { attended.add(who); if (!started) started = new Date(); }
        // Automatic reconnection: the offerer restarts ICE when the path breaks.
        if (p.offerer && (pc.connectionState === "failed" || pc.connectionState === "disconnected") && !p.restarting) {
          p.restarting = setTimeout(() => { p.restarting = null; if (pc.connectionState !== "connected") offer(id, true); },
                                    pc.connectionState === "failed" ? 0 : 3000);
        }
      };
      return p;
    }

    async function offer(id, restart) {
      const p = peers.get(id);
      if (!p) return;
      const o = await p.pc.createOffer(restart ? { iceRestart: true } : {});
      await p.pc.setLocalDescription(o);
      send({ type: "offer", to: id, data: p.pc.localDescription.toJSON() });
    }

    async function flush(p) {
      for (const c of p.pending.splice(0)) await p.pc.addIceCandidate(c);
    }

    function admitButton(m) {
      const list = document.getElementById("tele-waiting");
      if (!list || list.querySelector('[data-peer="' + m.from + '"]')) return;
      const li = document.createElement("li"); li.dataset.peer = m.from;
      const b = document.createElement("button"); b.type = "button"; b.textContent = T.admit + " " + m.who;
      b.addEventListener("click", () => { send({ type: "admit", to: m.from }); li.remove(); });
      li.append(b); list.append(li);
    }

    function chatLine(who, text) {
      const li = document.createElement("li");
      li.textContent = who + " : " + text;
      document.getElementById("tele-chat-log").append(li);
    }

    async function handle(m) {
      switch (m.type) {
        case "welcome":
          iceServers = m.ice_servers || [];
          admitted = m.admitted;
          if (admitted) { say(T.incall); send({ type: "hello" }); } else {
            say(T.waiting);
            // Knock again now and then: a professional who arrives later sees the patient waiting.
            const knocking = setInterval(() => { if (admitted || ended) clearInterval(knocking); else send({ type: "knock" }); }, 4000);
          }
          break;
        case "knock":
          if (host) admitButton(m);
          break;
        case "admit":
          if (!admitted) { admitted = true; say(T.incall); send({ type: "hello" }); }
          break;
        case "hello":
          // A broadcast hello is a (re)join: start afresh with that peer and answer with a directed hello.
          // The smaller peer id makes the offer, so two peers never offer to each other at once.
          if (!m.to) { drop(m.from); send({ type: "hello", to: m.from }); }
          if (peerId < m.from && !peers.has(m.from)) { peer(m.from, m.who, true); await offer(m.from, false); }
          break;
        case "offer": {
          const p = peer(m.from, m.who, false);
          await p.pc.setRemoteDescription(m.data);
          await flush(p);
          await p.pc.setLocalDescription(await p.pc.createAnswer());
          send({ type: "answer", to: m.from, data: p.pc.localDescription.toJSON() });
          break;
        }
        case "answer": {
          const p = peers.get(m.from);
          if (p) { await p.pc.setRemoteDescription(m.data); await flush(p); }
          break;
        }
        case "ice": {
          const p = peers.get(m.from);
          if (!p) break;
          if (p.pc.remoteDescription) await p.pc.addIceCandidate(m.data); else p.pending.push(m.data);
          break;
        }
        case "chat":
          chatLine(m.who, m.data);
          break;
        case "bye":
          drop(m.from);
          const w = document.querySelector('#tele-waiting [data-peer="' + m.from + '"]');
          if (w) w.remove();
          break;
        case "ended":
          finish();
          break;
      }
    }

    function finish() {
      ended = true;
      for (const id of Array.from(peers.keys())) drop(id);
      if (local) local.getTracks().forEach((t) => t.stop());
      if (ws) ws.close();
      say(T.ended);
    }

    async function stats() {
      const out = [];
      for (const [id, p] of peers) {
        const report = await p.pc.getStats();
        let frames = 0, lost = 0, received = 0, rtt = null;
        report.forEach((s) => {
          if (s.type === "inbound-rtp" && s.kind === "video") frames += s.framesDecoded || 0;
          if (s.type === "inbound-rtp") { lost += s.packetsLost || 0; received += s.packetsReceived || 0; }
          if (s.type === "candidate-pair" && s.nominated && s.state === "succeeded" && s.currentRoundTripTime !== undefined) rtt = s.currentRoundTripTime;
        });
        out.push({ peer: id, who: p.who, state: p.pc.connectionState, framesDecoded: frames,
                   loss: received + lost ? lost / (received + lost) : 0, rtt: rtt });
      }
      return out;
    }
    window.parcoursTele = { stats: stats, peerId: () => peerId };

    // Connection-quality indicator, from getStats every two seconds.
    setInterval(async () => {
      for (const s of await stats()) {
        const p = peers.get(s.peer);
        if (!p) continue;
        const q = p.tile.querySelector(".tele-quality");
        let level = "connecting";
        if (s.state === "connected") level = (s.rtt === null || s.rtt < 0.15) && s.loss < 0.02 ? "good" : (s.rtt < 0.4 && s.loss < 0.08 ? "fair" : "poor");
        q.textContent = T[level];
        q.className = "tele-quality tele-quality-" + level;
      }
    }, 2000);

    document.getElementById("tele-join").addEventListener("click", async (e) => {
      e.target.disabled = true;
      try {
        local = await navigator.mediaDevices.getUserMedia({ video: true, audio: true });
        document.getElementById("tele-local").srcObject = local;
      } catch (err) {
        local = null; // join without media rather than not at all (chat still works)
      }
      connect();
    });
    document.getElementById("tele-chat").addEventListener("submit", (e) => {
      e.preventDefault();
      const input = document.getElementById("tele-chat-text");
      if (!input.value.trim() || !admitted) return;
      send({ type: "chat", data: input.value });
      chatLine(T.you, input.value);
      input.value = "";
    });
    document.getElementById("tele-leave").addEventListener("click", () => { send({ type: "bye" }); finish(); });
    const end = document.getElementById("tele-end");
    if (end) end.addEventListener("click", async () => {
      const body = new FormData();
      body.append("csrf_token", T.csrf);
      body.append("started", (started || new Date()).toISOString());
      attended.forEach((w) => body.append("attended", w));
      const r = await fetch("/telehealth/rooms/" + encodeURIComponent(roomId) + "/end",
                            { method: "POST", body: body, headers: { "X-CSRF-Token": T.csrf }, credentials: "same-origin" });
      if (r.ok) { const j = await r.json(); finish(); location.assign(j.report); }
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    const check = document.getElementById("tele-check");
    if (check) deviceCheck(check);
    const r = document.getElementById("tele-room");
    if (r) room(r);
  });
})();
