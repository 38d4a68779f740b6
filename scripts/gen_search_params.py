"""Generate the compact search-parameter table shipped with Parcours.

Input: the official FHIR R4 (4.0.1) ``search-parameters.json`` (Bundle of
SearchParameter) and the CompartmentDefinition for Patient. Output:
``src/parcours/fhir/data/search_parameters.json``, read at start-up by
``parcours.fhir.registry``. Run: ``python scripts/gen_search_params.py DEFINITIONS_DIR``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src/parcours/fhir/data/search_parameters.json"


def main(defs: Path) -> None:
    bundle = json.loads((defs / "search-parameters.json").read_text())
    sps = [e["resource"] for e in bundle["entry"]]
    by_url = {sp["url"]: sp for sp in sps}
    params = []
    for sp in sps:
        if not sp.get("expression") and sp["type"] != "special":
            continue
        row = {
            "code": sp["code"],
            "base": sp["base"],
            "type": sp["type"],
            "expression": sp.get("expression", ""),
            "url": sp["url"],
        }
        if sp.get("target"):
            row["target"] = sp["target"]
        if sp.get("component"):
            row["component"] = [
                {"code": by_url[c["definition"]]["code"], "type": by_url[c["definition"]]["type"], "expression": c["expression"]}
                for c in sp["component"]
            ]
        params.append(row)
    capability = json.loads((defs / "CapabilityStatement-base.json").read_text())
    types = sorted(r["type"] for r in capability["rest"][0]["resource"])
    compartment = json.loads((defs / "CompartmentDefinition-patient.json").read_text())
    patient_compartment = {r["code"]: r.get("param", []) for r in compartment["resource"] if r.get("param")}
    out = {
        "fhirVersion": "4.0.1",
        "source": "hl7.fhir.r4.examples 4.0.1 Bundle-searchParams.json",
        "resourceTypes": types,
        "patientCompartment": patient_compartment,
        "searchParameters": params,
    }
    OUT.write_text(json.dumps(out, separators=(",", ":"), ensure_ascii=False))
    print(f"wrote {OUT} ({len(params)} parameters, {len(types)} resource types)")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/fhir-r4-definitions"))
