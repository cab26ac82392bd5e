"""The models the app offers: the embedded ones by name, any local HF directory or hub id, or
in public mode only the embedded ones and an allow-list.

A `ModelStore` loads each model once, packs the runtime's weights for it once, and shares both
read-only between runs and visitors. Each loaded model keeps its warm runtimes (KV cache, FFN
modes, firing counts: app/pool.py), built and warmed once per mode, options and kernels and
lent to one run at a time. The same model on both sides, in two modes, is one copy of the
weights. The store keeps what it holds within a memory budget, evicting the least recently used
model (its warm runtimes with it), and refuses a model that cannot fit before loading any of it.
"""

import gc
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from turbo_demo.app.engine.pool import RuntimePool
from turbo_demo.checkpoints.checkpoint import load_model, load_tokenizer
from turbo_demo.checkpoints.config import check_model_dir, load_config
from turbo_demo.checkpoints.generation import Generation, read_generation
from turbo_demo.checkpoints.hub import fetch, is_hub_id
from turbo_demo.checkpoints.memory import BUDGET_ENV, Estimate, check_fits, default_budget, estimate
from turbo_demo.checkpoints.powerinfer import predictor_folder
from turbo_demo.checkpoints.quantized import check_quant, load_quantized, stored_config, stored_quant
from turbo_demo.choices import modes_for
from turbo_demo.errors import UserError
from turbo_demo.paths import DENSE_MODEL, DRELU_MODEL, MODELS_DIR, MOE_DENSE_MODEL, MOE_DRELU_MODEL, RELUFIED_MODEL
from turbo_demo.runtime.packing import PackedModel, pack

EMBEDDED = {  # menu name: folder under MODELS_DIR
    "Dense SwiGLU": DENSE_MODEL.name,
    "TurboSparse dReLU": DRELU_MODEL.name,
    "ReLUfied dReLU": RELUFIED_MODEL.name,
    "Dense MoE": MOE_DENSE_MODEL.name,
    "TurboSparse MoE": MOE_DRELU_MODEL.name,
}
DEFAULT_LEFT = ("Dense SwiGLU", "dense")
DEFAULT_RIGHT = ("TurboSparse dReLU", "predictor")


def resolve(
    name_or_path: str, allowed: tuple[str, ...] | None = None, on_progress: Callable[[str], None] | None = None
) -> Path:
    """An embedded model's name, a path to a local checkpoint directory, or a hub id (fetched
    into the hub cache) -> its directory. With `allowed` (public mode) only the embedded names
    and those listed are accepted, and a refusal names neither paths nor whether they exist."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise UserError("no model chosen")
    name_or_path = name_or_path.strip()
    if name_or_path in EMBEDDED:
        return check_model_dir(MODELS_DIR / EMBEDDED[name_or_path])
    if allowed is not None and name_or_path not in allowed:
        offered = ", ".join([*embedded_names(), *allowed])
        raise UserError(f"this app offers only its listed models ({offered}); {name_or_path[:60]!r} is not one")
    path = Path(name_or_path).expanduser()
    if not is_dir(path) and is_hub_id(name_or_path):
        path = fetch(name_or_path, on_progress)
    return check_model_dir(path)


def is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a name too long, a directory we may not enter: check_model_dir says which
        return False


def embedded_names() -> list[str]:
    """Embedded models present in this checkout, in menu order."""
    return [name for name, folder in EMBEDDED.items() if (MODELS_DIR / folder / "config.json").is_file()]


def model_modes(name_or_path: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    """The modes a model offers, from its config (no weights are read; a hub id must be cached)."""
    if isinstance(name_or_path, str) and is_hub_id(name_or_path.strip()) and not is_dir(Path(name_or_path)):
        if allowed is not None and name_or_path.strip() not in allowed:
            resolve(name_or_path, allowed)  # the allow-list's refusal
        return ["dense", "exact", "predictor", "threshold"]  # known once it is fetched, at Generate
    path = resolve(name_or_path, allowed)
    if stored_quant(path):  # quantized checkpoints take no PowerInfer folder (load_quantized)
        return modes_for(stored_config(path))
    config = load_config(path)
    return modes_for(config, predictor_folder(path, config) is not None)


def identity(path: Path) -> tuple:
    """What changes when a checkpoint directory is replaced: each file's name, size, inode and
    modification time (a stat per file, no reads)."""
    files = sorted(p for p in path.iterdir() if p.is_file())
    return tuple((p.name, s.st_size, s.st_ino, s.st_mtime_ns) for p in files for s in [p.stat()])


@dataclass
class LoadedModel:
    name: str
    path: Path
    packed: PackedModel
    tokenizer: Any
    generation: Generation
    identity: tuple = ()
    runtime_bytes: int = 0  # what one runtime holds beyond the pack (its KV cache, estimated)
    runtimes: RuntimePool = field(init=False, repr=False, compare=False)  # its warm runtimes

    def __post_init__(self):
        self.runtimes = RuntimePool(self.packed, self.runtime_bytes)

    @property
    def model(self):
        return self.packed.model

    @property
    def weight_bytes(self) -> int:
        """The model's weights and the copies the runtime's pack made of some of them."""
        # a quantized load's float matrices stay on the meta device: only its blocks exist
        own = sum(p.numel() * p.element_size() for p in self.model.parameters() if not p.is_meta)
        return own + self.packed.owned_bytes


class ModelStore:
    """Loads each model directory once (thread-safe) and hands out the shared instance, holding
    models within a memory budget (bytes; None: memory.default_budget) and evicting the least
    recently used.

    Eviction drops the store's reference and the model's idle warm runtimes: a run still using
    an evicted model keeps its pack (model and copies) alive (Python refcounts), so the pack
    still counts against the budget, and asking for the model again wraps that same pack (with
    a new, empty pool of runtimes) instead of loading a second copy.
    """

    def __init__(self, budget: int | None = None, allowed: tuple[str, ...] | None = None):
        """allowed: public mode's allow-list beyond the embedded models (None: any path)."""
        self.budget = default_budget() if budget is None else budget
        self.allowed = allowed
        # by (real path, quantization): a model loaded at int8 is another copy than at bf16
        self._held: OrderedDict[tuple[Path, str | None], LoadedModel] = OrderedDict()  # least recently used first
        # every pack loaded here and still referenced, by (real path, quantization, identity): a
        # directory replaced on disk is another model
        self._packs: weakref.WeakValueDictionary[tuple, PackedModel] = weakref.WeakValueDictionary()
        self._sizes: dict[tuple, Estimate] = {}  # the estimate of each pack in _packs
        self._lock = threading.Lock()

    def used(self) -> int:
        """Estimated bytes of every pack loaded here and still referenced, held or not (each
        estimate counts one runtime), and of the held models' further idle warm runtimes."""
        packs = sum(self._sizes[key].total for key in list(self._packs))  # a copy: frees remove entries
        return packs + sum(loaded.runtimes.extra_bytes for loaded in list(self._held.values()))

    def get(
        self, name_or_path: str, on_load: Callable[[str], None] | None = None, quant: str | None = None
    ) -> LoadedModel:
        """The loaded model, its matrices quantized at load in `quant` ("int8", "int4"; None: as
        stored, a `quantize` checkpoint's blocks included); on_load(message), when given, hears
        before a load starts."""
        return self.load(name_or_path, on_load, quant)[0]

    def load(
        self, name_or_path: str, on_load: Callable[[str], None] | None = None, quant: str | None = None
    ) -> tuple[LoadedModel, float]:
        """As `get`, and the seconds this call spent loading the model or waiting for another
        call's load of it: 0.0 where the store held it and no load was under way."""
        start = time.perf_counter()
        if quant is not None:
            check_quant(quant)  # before anything is read: a menu or API value from outside
        path = resolve(name_or_path, self.allowed, on_load).resolve()  # aliases share one entry
        quant = quant or stored_quant(path)
        waited = not self._lock.acquire(blocking=False)  # another call holds it: a load, maybe
        if waited:
            self._lock.acquire()
        try:
            now = identity(path)
            loaded = self._held.get((path, quant))
            if loaded is not None and loaded.identity != now:  # replaced on disk: load it afresh
                del self._held[path, quant]
                loaded.runtimes.close()
                loaded = None
            if loaded is None:
                packed = self._packs.get((path, quant, now)) or self._load(name_or_path, path, now, on_load, quant)
                tokenizer = load_tokenizer(path)
                generation = read_generation(path, packed.model.config, tokenizer)
                kv = self._sizes[path, quant, now].kv_cache
                loaded = LoadedModel(name_or_path, path, packed, tokenizer, generation, now, kv)
                waited = True  # this call read it from disk (or wrapped a pack a run still held)
            self._held[path, quant] = loaded
            self._held.move_to_end((path, quant))
        finally:
            self._lock.release()
        return loaded, (time.perf_counter() - start) if waited else 0.0

    def _load(self, name_or_path: str, path: Path, ident: tuple, on_load, quant: str | None = None) -> PackedModel:
        """Evict until the model fits, then load and pack it; a UserError when it cannot fit."""
        stored = stored_quant(path)
        config = stored_config(path) if stored else None
        need = estimate(path, None, config, None if stored else quant)
        check_fits(need, self.budget, f"is the model store's budget ({BUDGET_ENV} sets it, in GB)")
        while self._held and self.used() + need.total > self.budget:
            self._held.popitem(last=False)[1].runtimes.close()
            gc.collect()  # a model's reference cycles would otherwise keep it (and its bytes) a while
        check_fits(need, self.budget - self.used(), "are free in the model store's budget: runs still use the rest")
        if on_load is not None:
            on_load(f"Loading {name_or_path}…")
        packed = load_quantized(path, quant, need.dtype) if quant else pack(load_model(path, need.dtype))
        self._sizes = {k: self._sizes[k] for k in list(self._packs)} | {(path, quant, ident): need}
        self._packs[path, quant, ident] = packed  # (freed ones left _sizes above)
        return packed
