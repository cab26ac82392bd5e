"""What a checkpoint's weights are, read from the safetensors headers alone (no tensor data).

A safetensors file starts with an 8-byte little-endian header length n, then n bytes of JSON:
{name: {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}.
A sharded checkpoint lists its files in model.safetensors.index.json ("weight_map": name ->
file). Reading the headers costs a few kilobytes per file, so shapes (predictor ranks) and
sizes (the memory a load needs) are known before anything is allocated.
"""

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from turbo_demo.errors import UserError

INDEX = "model.safetensors.index.json"
# Bytes per element of each safetensors dtype.
ITEMSIZE = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4,
    "F16": 2, "BF16": 2, "I16": 2, "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip
MAX_HEADER = 100 << 20  # the safetensors library's own limit


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    file: str

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE.get(self.dtype, 4)


def safetensors_files(path: Path) -> list[Path]:
    """The shards the index names (each once, inside `path`), else every *.safetensors file."""
    index = path / INDEX
    if not index.is_file():
        return sorted(path.glob("*.safetensors"))
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{path.name}/{INDEX} is not a safetensors index: {exc}") from exc
    files = []
    for name in names:
        file = (path / name).resolve()
        if not isinstance(name, str) or file.parent != path.resolve():
            raise UserError(f"{path.name}/{INDEX} names a weight file outside its directory: {name!r}")
        if not file.is_file():
            raise UserError(f"{path.name}/{INDEX} names a missing shard: {name}")
        files.append(file)
    return files


def read_header(file: Path) -> dict[str, TensorInfo]:
    """The tensors one safetensors file declares, from its header."""
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER:
                raise ValueError(f"header of {n} bytes")
            header = json.loads(f.read(n))
        return {
            name: TensorInfo(str(v["dtype"]), tuple(int(d) for d in v["shape"]), file.name)
            for name, v in header.items()
            if name != "__metadata__"
        }
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise UserError(f"{file.name} is not a readable safetensors file: {exc}") from exc


def read_headers(path: Path) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint directory's safetensors weights; {} for .bin checkpoints."""
    tensors: dict[str, TensorInfo] = {}
    for file in safetensors_files(path):
        tensors.update(read_header(file))
    return tensors


# Where each architecture that carries predictors keeps their fc1 (rank, hidden), as published
PREDICTOR_FC1 = {
    "bamboo": "model.layers.{layer}.mlp.predictor.fc1.weight",
    "turbosparsemixtral": "model.layers.{layer}.block_sparse_moe.experts.{expert}.predictor.fc1.weight",
}


def predictor_ranks(config, tensors: dict[str, TensorInfo]) -> list[int] | list[list[int]] | None:
    """Each layer's predictor rank (a mixture of experts': a list per layer of each expert's) from
    the rows of its fc1 in `tensors` (read_headers), 0 where one has none; None where none has."""
    name = PREDICTOR_FC1[config.model_type]

    def rank(layer: int, expert: int | None = None) -> int:
        fc1 = tensors.get(name.format(layer=layer, expert=expert))
        return fc1.shape[0] if fc1 is not None else 0

    layers = range(config.num_hidden_layers)
    if "{expert}" not in name:
        per_layer = [rank(i) for i in layers]
        return per_layer if any(per_layer) else None
    per_expert = [[rank(i, e) for e in range(config.num_local_experts)] for i in layers]
    return per_expert if any(map(any, per_expert)) else None
