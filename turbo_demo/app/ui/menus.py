"""The model and mode menus of the page, as plain functions (the page maps them to widgets)."""

from turbo_demo.app.engine.catalog import model_modes
from turbo_demo.choices import MODE_HELP
from turbo_demo.errors import UserError

MODE_LABELS = {
    "dense": "dense: every neuron",
    "exact": "exact: ReLU gate > 0 only (= dense)",
    "predictor": "predictor: the published TurboSparse model",
    "threshold": "threshold: |gate| over a calibrated t",
}

AS_STORED = "stored"
QUANT_CHOICES = [
    ("as stored (bf16 / fp32)", AS_STORED),
    ("int8: blocks of 32, a scale each", "int8"),
    ("int4: blocks of 32, scale and minimum", "int4"),
]


def quant_of(value) -> str | None:
    """A side's weights menu value as SideRequest.quant: None for the weights as stored."""
    return None if value in (AS_STORED, None, "") else str(value)  # the store refuses others


def mode_choices(name: str, allowed: tuple[str, ...] | None = None) -> tuple[list[tuple[str, str]], str]:
    """The modes a model offers as (label, mode) pairs, and an error line where it cannot be read."""
    try:
        if not isinstance(name, str):
            raise UserError("choose a model from the menu")
        modes, error = model_modes(name, allowed), ""
    except UserError as exc:
        modes, error = ["dense"], f"⚠️ {exc}"
    return [(MODE_LABELS[m], m) for m in modes], error


def settled_mode(modes: list[tuple[str, str]], current: str, preferred: str) -> str:
    """The mode a pane runs among `modes` (mode_choices' pairs): `current` where offered, else
    the pane's `preferred` default, else the first. It is what the mode menu shows once a model
    change has been applied, so a Generate clicked before that (the menu's old value sent with
    the new model) runs what the menu is about to show."""
    values = [m for _, m in modes]
    return current if current in values else (preferred if preferred in values else values[0])


def mode_help(mode: str) -> str:
    return f"_{mode}_: {MODE_HELP[mode]}" if mode in MODE_HELP else ""
