"""The models the app offers: the embedded ones by name, or any local HF directory.

A `ModelStore` loads each model once, packs the runtime's weights for it once, and shares both
read-only between runs and visitors; every run builds its own runtime (KV cache, FFN modes,
firing counts) on top of them. The same model on both sides, in two modes, is one copy of the
weights. The store keeps what it holds within a memory budget, evicting the least recently used
model, and refuses a model that cannot fit before loading any of it.
"""

import gc
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from turbo_demo.errors import UserError
from turbo_demo.model.checkpoint import check_model_dir, load_config, load_model, load_tokenizer
from turbo_demo.model.generation import Generation, read_generation
from turbo_demo.model.memory import BUDGET_ENV, check_fits, default_budget, estimate
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
    """Loads each model directory once (thread-safe) and hands out the shared instance, holding
    models within a memory budget (bytes; None: memory.default_budget) and evicting the least
    recently used.

    Eviction drops the store's reference only: a run still using an evicted model keeps its pack
    (model and copies) alive (Python refcounts), so the pack still counts against the budget,
    and asking for the model again wraps that same pack instead of loading a second copy.
    """

    def __init__(self, budget: int | None = None):
        self.budget = default_budget() if budget is None else budget
        self._held: OrderedDict[Path, LoadedModel] = OrderedDict()  # least recently used first
        self._packs: weakref.WeakValueDictionary[Path, PackedModel] = weakref.WeakValueDictionary()
        self._sizes: dict[Path, int] = {}  # estimated bytes of each pack in _packs
        self._lock = threading.Lock()

    def used(self) -> int:
        """Estimated bytes of every pack loaded here and still referenced, held or not."""
        return sum(self._sizes[path] for path in list(self._packs))  # a copy: frees remove entries

    def get(self, name_or_path: str, on_load: Callable[[str], None] | None = None) -> LoadedModel:
        """The loaded model; on_load(message), when given, hears before a load starts."""
        path = resolve(name_or_path).resolve()  # aliases of one directory share one entry
        with self._lock:
            loaded = self._held.get(path)
            if loaded is None:
                packed = self._packs.get(path) or self._load(name_or_path, path, on_load)
                tokenizer = load_tokenizer(path)
                generation = read_generation(path, packed.model.config, tokenizer)
                loaded = LoadedModel(name_or_path, path, packed, tokenizer, generation)
            self._held[path] = loaded
            self._held.move_to_end(path)
            return loaded

    def _load(self, name_or_path: str, path: Path, on_load) -> PackedModel:
        """Evict until the model fits, then load and pack it; a UserError when it cannot fit."""
        need = estimate(path)
        check_fits(need, self.budget, f"is the model store's budget ({BUDGET_ENV} sets it, in GB)")
        while self._held and self.used() + need.total > self.budget:
            self._held.popitem(last=False)
            gc.collect()  # a model's reference cycles would otherwise keep it (and its bytes) a while
        check_fits(need, self.budget - self.used(), "are free in the model store's budget: runs still use the rest")
        if on_load is not None:
            on_load(f"Loading {name_or_path}…")
        packed = pack(load_model(path, need.dtype))
        self._sizes = {p: self._sizes[p] for p in list(self._packs)} | {path: need.total}  # the freed ones go
        self._packs[path] = packed
        return packed
