"""A run people can keep: a zip of its records and figures, and a link that reproduces it.

    run_zip(left, right, settings, figures) -> bytes   records.json, steps.csv, one HTML per figure
    share_query(prompt, left, right, settings) -> str  "?prompt=...&left=..." for the page's URL
    settings_from_query(params) -> dict                the page's fields from such a query, checked

steps.csv has one row per side, step and layer: the numbers the heatmaps, speed and recall
panels draw. Figures are standalone HTML (Plotly's JavaScript inlined), so they open offline.
"""

import base64
import csv
import io
import json
import tempfile
import zipfile
from dataclasses import asdict, replace
from pathlib import Path
from urllib.parse import urlencode

import plotly.graph_objects as go

from turbo_demo.app.engine.compare import Settings
from turbo_demo.app.engine.sides import SideSnapshot, compare_summary
from turbo_demo.choices import MODES, QUANTS
from turbo_demo.errors import UserError
from turbo_demo.runtime.stats import NEURON_CODES

STEP_COLUMNS = [
    "side",
    "model",
    "mode",
    "step",
    "token",
    "time_s",
    "layer",
    "active",
    "computed",
    "recall",
    "ffn_bytes",
]
# The query keys a shared link carries, and the Settings field each sets.
QUERY_NUMBERS = {"tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p", "seed": "seed"}
MAX_QUERY_PROMPT = 2000
MAPS_FORMAT = (
    "sides.*.maps: per decode step, base64 of the neuron codes of map_shape (layers, neurons), "
    "row-major, 2 bits a neuron, four a byte, the first in the low bits; codes: "
    + ", ".join(f"{i} {name}" for i, name in enumerate(NEURON_CODES))
)


def step_rows(side: str, rec: SideSnapshot) -> list[list]:
    rows = []
    for s in rec.steps:
        for layer, active in enumerate(s.active_share):
            recall = s.recall[layer] if s.recall else ""
            row = [side, rec.model, rec.mode, s.step, s.token, s.time_s, layer, active, s.computed_share[layer]]
            rows.append([*row, recall, s.ffn_bytes])
    return rows


def side_dict(rec: SideSnapshot) -> dict:
    """A side's record as JSON: its fields, steps as StepStats.to_dict, maps in base64."""
    fields = asdict(replace(rec, steps=[], maps=[]))  # emptied: asdict would deep-copy them
    maps = [base64.b64encode(m).decode() for m in rec.maps]
    return fields | {"steps": [s.to_dict() for s in rec.steps], "maps": maps}


def run_zip(left: SideSnapshot, right: SideSnapshot, settings: Settings, figures: dict[str, go.Figure]) -> bytes:
    """The run as a zip archive (bytes)."""
    records = {
        "settings": asdict(settings),
        "summary": compare_summary(left, right),
        "sides": {side: side_dict(rec) for side, rec in (("left", left), ("right", right))},
        "maps_format": MAPS_FORMAT,
    }
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(STEP_COLUMNS)
    for side, rec in (("left", left), ("right", right)):
        writer.writerows(step_rows(side, rec))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("records.json", json.dumps(records, indent=1))
        z.writestr("steps.csv", table.getvalue())
        for name, fig in figures.items():
            z.writestr(f"{name}.html", fig.to_html(include_plotlyjs=True, full_html=True))
    return out.getvalue()


def write_run_zip(left: SideSnapshot, right: SideSnapshot, settings: Settings, figures: dict[str, go.Figure]) -> str:
    """run_zip written to a fresh temporary directory (Gradio serves it from there, and the
    page's cache cleaning deletes it) -> the file's path."""
    path = Path(tempfile.mkdtemp(prefix="turbosparse-run-")) / "turbosparse-run.zip"
    path.write_bytes(run_zip(left, right, settings, figures))
    return str(path)


def share_query(
    prompt: str, left: tuple[str, str], right: tuple[str, str], settings: Settings, quants=(None, None)
) -> str:
    """The query string that reopens the page with this prompt, models, modes, weights (quants:
    each side's quantization, None as stored) and settings."""
    values = {"prompt": prompt[:MAX_QUERY_PROMPT], "left": left[0], "left_mode": left[1], "right": right[0]}
    values["right_mode"] = right[1]
    values |= {f"{side}_quant": q for side, q in zip(("left", "right"), quants) if q}
    values |= {key: getattr(settings, field) for key, field in QUERY_NUMBERS.items()}
    return "?" + urlencode(values)


def settings_from_query(params: dict[str, str], models: list[str]) -> dict:
    """The page fields a shared link sets: only known keys, models the menu offers, known modes,
    numbers that parse; anything else is left out (the page keeps its default)."""
    fields: dict = {}
    if isinstance(params.get("prompt"), str):
        fields["prompt"] = params["prompt"][:MAX_QUERY_PROMPT]
    for key in ("left", "right"):
        if params.get(key) in models:
            fields[key] = params[key]
        if params.get(f"{key}_mode") in MODES:
            fields[f"{key}_mode"] = params[f"{key}_mode"]
        if params.get(f"{key}_quant") in QUANTS:
            fields[f"{key}_quant"] = params[f"{key}_quant"]
    for key, field in QUERY_NUMBERS.items():
        try:
            value = float(params[key])
        except (KeyError, TypeError, ValueError):
            continue
        fields[field] = value
    try:
        checked = Settings(**{k: fields[k] for k in QUERY_NUMBERS.values() if k in fields}).checked()
    except UserError:  # a value that is not finite, or a seed out of range: the page's defaults
        return {k: v for k, v in fields.items() if k not in QUERY_NUMBERS.values()}
    return fields | {k: getattr(checked, k) for k in QUERY_NUMBERS.values() if k in fields}
