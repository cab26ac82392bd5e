"""The token inspector's data, as plain functions of a run's records (no gradio, no tensors kept).

Each decode step's neuron codes (stats.NEURON_CODES) come packed in the SideSnapshot, 2 bits a
neuron (stats.pack_codes). A session keeps its last run as `keep(left, right)`, a few hundred
kB for the embedded models (compare.MAX_MAP_BYTES per side at most); `token_spans` gives a
pane's tokens with their FFN sparsity for the highlighted text, `maps_at(kept, step)` both
panes' maps at one position for `plots_inspector.neuron_maps_figure`.
"""

import math

from turbo_demo.app.engine.sides import SideSnapshot
from turbo_demo.app.views.compare import side_label
from turbo_demo.runtime.stats import unpack_codes

# What a session keeps for a 256-token run of the embedded models (4 layers x 1280 neurons:
# 2 x 256 x 1,280 bytes of maps, and the pieces) stays under this (tests/test_inspector.py)
SESSION_BOUND = 2**20


def token_spans(rec: SideSnapshot) -> list[tuple[str, float | None]]:
    """(text piece, FFN sparsity of the step that produced it) per generated token, for a
    highlighted-text view (the score shades the piece; None where the mode records none)."""
    return [(piece, step.sparsity) for piece, step in zip(rec.pieces, rec.steps)]


def keep(left: SideSnapshot, right: SideSnapshot) -> dict:
    """What a session keeps of a run for the inspector: per side its label, mode, token pieces,
    step sparsities and packed maps, with the map's shape (layers, neurons)."""
    return {
        side: {
            "label": side_label(rec),
            "mode": rec.mode,
            "pieces": list(rec.pieces),
            "sparsity": [s.sparsity for s in rec.steps],
            "shape": rec.map_shape,
            "maps": list(rec.maps),
        }
        for side, rec in (("left", left), ("right", right))
        if not rec.error and rec.steps
    }


def kept_bytes(kept: dict) -> int:
    """The maps' share of a kept run's size, in bytes (the pieces and numbers add a few kB)."""
    return sum(len(m) for side in kept.values() for m in side["maps"])


def steps_of(kept: dict) -> int:
    return max((len(side["pieces"]) for side in kept.values()), default=0)


def maps_at(kept: dict, step: int) -> list[dict]:
    """Both panes at one generated position: per side its label, mode, the token, the step's
    sparsity and its (layers, neurons) codes, or None where the side has no map for that step."""
    shown = []
    for side in kept.values():
        layers, neurons = side["shape"]
        has = step < len(side["maps"]) and layers * neurons > 0
        shown.append(
            {
                "label": side["label"],
                "mode": side["mode"],
                "token": side["pieces"][step] if step < len(side["pieces"]) else None,
                "sparsity": side["sparsity"][step] if step < len(side["sparsity"]) else None,
                "codes": unpack_codes(side["maps"][step], layers, neurons) if has else None,
            }
        )
    return shown


def grid(codes: list[int]) -> list[list[int | None]]:
    """One layer's codes as a near-square grid, row-major, the last row padded with None."""
    cols = max(1, math.ceil(math.sqrt(len(codes))))
    rows = math.ceil(len(codes) / cols)
    padded = codes + [None] * (rows * cols - len(codes))
    return [padded[r * cols : (r + 1) * cols] for r in range(rows)]
