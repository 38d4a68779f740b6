/* The booking search map (Leaflet). The result list is the page; the map is a second view of
   it, drawn only when Leaflet loaded. No tiles configured (or offline): markers on a plain map. */
(function () {
  "use strict";
  var el = document.getElementById("booking-map");
  if (!el || !window.L) { return; }
  var data = JSON.parse(el.getAttribute("data-map") || "{}");
  el.hidden = false;
  var map = window.L.map(el, { scrollWheelZoom: false }).setView([data.center.lat, data.center.lon], 12);
  if (data.tiles) {
    window.L.tileLayer(data.tiles, { maxZoom: 19, attribution: "&copy; OpenStreetMap" }).addTo(map);
  }
  var bounds = [];
  (data.points || []).forEach(function (p) {
    var icon = window.L.divIcon({ className: "map-pin", html: String(p.n), iconSize: [30, 30], iconAnchor: [15, 15] });
    var marker = window.L.marker([p.lat, p.lon], { icon: icon, title: p.n + ". " + p.name, alt: p.n + ". " + p.name,
                                                   keyboard: false }).addTo(map);
    marker.on("click", function () { window.location.href = p.href; });
    bounds.push([p.lat, p.lon]);
  });
  if (bounds.length) { map.fitBounds(bounds, { padding: [30, 30], maxZoom: 14 }); }
})();
