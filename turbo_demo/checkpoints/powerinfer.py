"""PowerInfer's predictor folders: the per-layer activation predictors published beside a model.

PowerInfer (github.com/SJTU-IPADS/PowerInfer) runs ReLU models: ReluLLaMA (a Llama checkpoint
with "hidden_act": "relu", h = relu(W_gate x) * (W_up x)) and Bamboo (dReLU, model_type
"bamboo"). Their predictors are published as folders of their own, named after the model
(PowerInfer/ReluLLaMA-7B-Predictor for SparseLLM/ReluLLaMA-7B, PowerInfer/Bamboo-base-v0.1-predictor
for PowerInfer/Bamboo-base-v0_1); its converters (convert.py, convert-hf-to-powerinfer-gguf.py,
`MODEL_DIR PREDICTOR_DIR`) read them as

    model_{i}.pt   one per layer i = 0 .. L-1: torch.save of {"fc1.weight": (r_i, hidden),
                   "fc2.weight": (n_ff, r_i)}, no biases, fp32; the rank r_i may differ per layer
    config.json    optional: {"sparse_threshold": t}, stored in the GGUF as powerinfer.sparse_threshold

Its runtime skips neuron i of a layer where score_i < t (its kernels compare in float32; t is 0.0
where the folder names none), score = fc2(relu(fc1(r))) with no sigmoid, r the residual stream
before the layer's ffn_norm (post_attention_layernorm's input): BambooPredictor's score, with the
rule "computed iff score_i >= t", which PowerInferPredictor carries as `min_score`.

    predictor_folder(model_dir, config, given)   the folder to attach: given, or the one beside
    read_predictors(folder, config, dtype)       every layer's predictor, checked against the model
    attach_predictors(model, predictors)         at load time, before anyone else holds the model
"""

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from turbo_demo.errors import UserError
from turbo_demo.models.bamboo import BambooPredictor
from turbo_demo.models.hooks import ffn_modules

CONFIG = "config.json"
SUFFIX = "-predictor"  # matched case aside: ReluLLaMA-7B-Predictor, Bamboo-base-v0.1-predictor


def layer_file(layer: int) -> str:
    return f"model_{layer}.pt"


class PowerInferPredictor(BambooPredictor):
    """A predictor read from a PowerInfer folder: BambooPredictor's score, PowerInfer's rule
    (neuron i is computed iff score_i >= min_score, the folder's sparse_threshold)."""

    def __init__(self, fc1: torch.Tensor, fc2: torch.Tensor, min_score: float):
        with torch.device("meta"):  # no random initialisation of weights replaced at once
            super().__init__(fc1.shape[1], fc1.shape[0], fc2.shape[0])
        self.fc1.weight = nn.Parameter(fc1, requires_grad=False)
        self.fc2.weight = nn.Parameter(fc2, requires_grad=False)
        self.min_score = min_score


@dataclass(frozen=True)
class PowerInferPredictors:
    """A predictor folder, read and checked: per layer, in order, fc1 (r_i, hidden) and fc2
    (n_ff, r_i) in the load dtype, on the CPU; min_score the rule's threshold."""

    folder: Path
    fc1: list[torch.Tensor]
    fc2: list[torch.Tensor]
    min_score: float


def pair_key(name: str) -> str:
    """A folder name as the published pairs match: case aside, "_" read as "." (the model
    Bamboo-base-v0_1, its predictors Bamboo-base-v0.1-predictor)."""
    return name.lower().replace("_", ".")


def find_predictors(model_dir: str | Path) -> Path | None:
    """The folder beside `model_dir` named after it plus "-Predictor" (as PowerInfer's repositories
    are named, downloaded side by side), or None; a UserError where several match."""
    model_dir = Path(os.path.normpath(Path(model_dir).absolute()))
    want = pair_key(model_dir.name) + SUFFIX
    try:
        found = sorted(p for p in model_dir.parent.iterdir() if pair_key(p.name) == want and p.is_dir())
    except OSError:  # a parent we may not list: nothing found beside it
        return None
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise UserError(f"{model_dir} has {len(found)} predictor folders beside it ({names}): name the one to use")
    return found[0] if found else None


def predictor_folder(model_dir: Path, config, given: str | Path | None = None) -> Path | None:
    """The PowerInfer folder to attach to the model in `model_dir`: `given`, else the one beside
    it (find_predictors). A checkpoint carrying predictors of its own (TurboSparse) keeps them:
    nothing is looked for beside it, and a given folder, which would replace them, is refused; so
    is one for a mixture of experts (PowerInfer's predictors are one per layer)."""
    own = bool(getattr(config, "predictor_rank", None))
    moe = bool(getattr(config, "num_local_experts", None))
    if given is None:
        return None if own or moe else find_predictors(model_dir)
    if own or moe:
        why = "carries predictors of its own, which it would replace" if own else "is a mixture of experts"
        raise UserError(f"{model_dir} {why}: PowerInfer predictors ({given}) attach to dense ReLU models")
    return Path(given)


def read_min_score(folder: Path) -> float:
    """The folder's config.json sparse_threshold; 0.0 (PowerInfer's default) where it names none."""
    file = folder / CONFIG
    if not file.is_file():
        return 0.0
    try:
        value = json.loads(file.read_text()).get("sparse_threshold")
    except (OSError, ValueError, AttributeError) as exc:
        raise UserError(f"{file} is not a readable JSON object: {exc}") from exc
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{file}: sparse_threshold must be a finite number, got {value!r}")
    return float(value)


def read_layer(file: Path, hidden: int, n_ff: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fc1 (r, hidden) and fc2 (n_ff, r) of one model_{i}.pt, as stored, checked against the model.
    torch.load runs with weights_only: a file that needs arbitrary unpickling is refused."""
    if not file.is_file():
        raise UserError(f"{file} is missing: a PowerInfer predictor folder holds one model_{{i}}.pt per layer")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip, pickle and refused-global errors alike: named once, on one line
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UserError(f"{file} is not a predictor saved with torch.save: {type(exc).__name__}: {first}") from exc
    found = [state.get(name) if isinstance(state, dict) else None for name in ("fc1.weight", "fc2.weight")]
    matrices = [w for w in found if isinstance(w, torch.Tensor) and w.dim() == 2 and w.is_floating_point()]
    if len(matrices) != 2:
        held = ", ".join(sorted(map(str, state))[:6]) if isinstance(state, dict) else type(state).__name__
        raise UserError(f"{file} holds no 2-D float fc1.weight and fc2.weight (it holds {held or 'nothing'})")
    fc1, fc2 = matrices
    rank = fc1.shape[0]
    if rank == 0 or fc1.shape != (rank, hidden) or fc2.shape != (n_ff, rank):
        raise UserError(
            f"{file}: fc1.weight {tuple(fc1.shape)} and fc2.weight {tuple(fc2.shape)} do not fit this model, "
            f"which needs (rank, {hidden}) and ({n_ff}, rank)"
        )
    return fc1, fc2


def read_predictors(folder: str | Path, config, dtype: torch.dtype) -> PowerInferPredictors:
    """Every layer's predictor in `folder` (model_{i}.pt for each of the config's layers, and not
    one more), in `dtype`, one file in memory in its stored dtype at a time."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"predictor folder not found: {folder}")
    layers = config.num_hidden_layers
    if (folder / layer_file(layers)).exists():
        raise UserError(f"{folder / layer_file(layers)} is one predictor more than the model's {layers} layers")
    min_score = read_min_score(folder)
    fc1, fc2 = [], []
    for i in range(layers):
        w1, w2 = read_layer(folder / layer_file(i), config.hidden_size, config.intermediate_size)
        fc1.append(w1.to(dtype))
        fc2.append(w2.to(dtype))
    return PowerInferPredictors(folder, fc1, fc2, min_score)


def attach_predictors(model: nn.Module, predictors: PowerInferPredictors) -> None:
    """Give each layer's MLP its predictor as `mlp.predictor` (where a bamboo checkpoint keeps its
    own), on the MLP's device. The MLP's forward never reads it (the dense model is unchanged);
    the runtime's pack does. Only at load time, to a model no one else holds yet."""
    mlps = ffn_modules(model)
    for mlp, fc1, fc2 in zip(mlps, predictors.fc1, predictors.fc2, strict=True):
        device = next(mlp.parameters()).device
        mlp.predictor = PowerInferPredictor(fc1.to(device), fc2.to(device), predictors.min_score)
