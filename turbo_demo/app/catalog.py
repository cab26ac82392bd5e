"""The models the app offers: the embedded ones by name, or any local HF directory.

A `ModelStore` loads each model once, packs the runtime's weights for it once, and shares both
read-only between runs and visitors; every run builds its own runtime (KV cache, FFN modes,
firing counts) on top of them.
"""

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from turbo_demo.errors import UserError
from turbo_demo.model.checkpoint import check_model_dir, load_config, load_model, load_tokenizer
from turbo_demo.model.generation import Generation, read_generation
from turbo_demo.paths import MODELS_DIR
from turbo_demo.runtime.packing import PackedModel, pack

EMBEDDED = {
    "Dense SwiGLU": "dense-swiglu",
    "TurboSparse dReLU": "turbosparse-drelu",
    "ReLUfied dReLU": "turbosparse-relufied",
}
DEFAULT_LEFT = ("Dense SwiGLU", "dense")
DEFAULT_RIGHT = ("TurboSparse dReLU", "predictor")


def resolve(name_or_path: str) -> Path:
    """An embedded model's name, or a path to a local checkpoint directory -> its directory."""
    name_or_path = (name_or_path or "").strip()
    if not name_or_path:
        raise UserError("no model chosen")
    if name_or_path in EMBEDDED:
        return check_model_dir(MODELS_DIR / EMBEDDED[name_or_path])
    return check_model_dir(Path(name_or_path).expanduser())


def modes_for(config) -> list[str]:
    """The backend modes a model supports: exact needs a ReLU gate, predictor trained predictors."""
    modes = ["dense"]
    if getattr(config, "hidden_act", None) == "relu":
        modes.append("exact")
    if getattr(config, "predictor_rank", None):
        modes.append("predictor")
    if hasattr(config, "intermediate_size"):
        modes.append("threshold")
    return modes


def embedded_names() -> list[str]:
    """Embedded models present in this checkout, in menu order."""
    return [name for name, folder in EMBEDDED.items() if (MODELS_DIR / folder / "config.json").is_file()]


def model_modes(name_or_path: str) -> list[str]:
    return modes_for(load_config(resolve(name_or_path)))


@dataclass
class LoadedModel:
    name: str
    path: Path
    packed: PackedModel
    tokenizer: Any
    generation: Generation

    @property
    def model(self):
        return self.packed.model

    @property
    def weight_bytes(self) -> int:
        """The model's weights and the copies the runtime's pack made of some of them."""
        own = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return own + self.packed.owned_bytes


class ModelStore:
    """Loads each model directory once (thread-safe) and hands out the shared instance."""

    def __init__(self):
        self._models: dict[Path, LoadedModel] = {}
        self._lock = threading.Lock()

    def get(self, name_or_path: str, on_load: Callable[[str], None] | None = None) -> LoadedModel:
        """The loaded model; on_load(message), when given, hears before a load starts."""
        path = resolve(name_or_path)
        with self._lock:
            if path not in self._models:
                if on_load is not None:
                    on_load(f"Loading {name_or_path}…")
                packed, tokenizer = pack(load_model(path)), load_tokenizer(path)
                generation = read_generation(path, packed.model.config, tokenizer)
                self._models[path] = LoadedModel(name_or_path, path, packed, tokenizer, generation)
            return self._models[path]
