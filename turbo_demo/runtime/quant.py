"""Block-quantized weights: llama.cpp's Q8_0 and Q4_0 blocks, one row per neuron.

A weight W (N, H) is stored as `QWeight.data`, uint8 (N, B * block_bytes) with B = ceil(H / 32)
blocks of 32 consecutive values of a row, the scale beside the data as in llama.cpp:

    int8 (Q8_0)  34 bytes: d (fp16), q[32] (int8)     w = d * q,        d = amax / 127
    int4 (Q4_0)  18 bytes: d (fp16), nibbles[16]      w = d * (q - 8),  d = -(the value of largest
                 |x|) / 8, q[j] in [0, 15]: the low nibble of byte j is value j, the high nibble
                 value j + 16

Both are llama.cpp's blocks byte for byte (the same bytes as gguf's quantize), so a GGUF written
from the same weights holds the same values as our pack.

A row past H is padded with zeros to the block. Rows are neurons, as in the bf16 pack: W_gate,
W_up as HF stores them, W_down transposed (wd_t), so that a sparse step reads each chosen
neuron's row as one contiguous run of blocks.

Activations are quantized per block too, on the fly, as llama.cpp quantizes the input of a
quantized GEMV (Q8_0, scale kept in fp32): `quantize_activation`. A dot product of a quantized
row with x is therefore dequantize(row) . dequantize(Q8(x)), which integer dot products compute
exactly per block (the C++ kernels); a weighted sum of rows (the down projection's axpy) reads
h unquantized.
"""

from dataclasses import dataclass

import torch

from turbo_demo.choices import QUANTS

BLOCK = 32
BLOCK_BYTES = {"int8": 2 + BLOCK, "int4": 2 + BLOCK // 2}
FORMAT_CODE = {"int8": 0, "int4": 1}  # the C++ kernels' names for the formats


@dataclass(frozen=True)
class QWeight:
    """A block-quantized (N, H) weight: data uint8 (N, blocks * block_bytes), see the module
    docstring. Quacks like the weight tensors the kernels take where they only need shapes."""

    data: torch.Tensor
    fmt: str
    cols: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.size(0), self.cols

    def size(self, dim: int) -> int:
        return self.shape[dim]

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def row_bytes(self) -> int:
        return self.data.size(1)

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def code(self) -> int:
        return FORMAT_CODE[self.fmt]

    def split(self, sizes: list[int]) -> tuple["QWeight", ...]:
        """Row views of the given sizes, as Tensor.split(sizes) gives a tensor's."""
        return tuple(QWeight(part, self.fmt, self.cols) for part in self.data.split(sizes))


# The format of each matrix a pack quantizes, by parameter name, per `quant`: int4 keeps the
# predictors and the LM head at int8 (llama.cpp's Q4 files keep output.weight at higher
# precision too): a predictor's scores decide which neurons run, and the predictors are only
# a few percent of the weights, so their int8 rows cost little of what int4 saves.
FORMATS = {
    "int8": {"ffn": "int8", "attention": "int8", "predictor": "int8", "lm_head": "int8"},
    "int4": {"ffn": "int4", "attention": "int4", "predictor": "int8", "lm_head": "int8"},
}


# Stored (out, in) by HF, kept neuron-major (in, out) by the pack: quantized transposed (W_down,
# a MoE expert's w2, and every predictor's fc2).
TRANSPOSED = ("mlp.down_proj.weight", ".w2.weight", "predictor.fc2.weight")

# A quantized pack also keeps W_down (and a MoE expert's w2) as HF stores it, (H, I) in blocks
# along the neurons, llama.cpp's ffn_down: the dense formula reads it as integer dot products
# with h quantized per block (its neuron-major blocks, read as a weighted sum of rows, convert
# every weight to fp32: half the speed at int4). Its name in a pack: `rows_name` of W_down's.
DOWN = ("mlp.down_proj.weight", ".w2.weight")


def rows_name(name: str) -> str:
    """The pack's name for the (H, I) blocks of W_down `name`: mlp.down_proj.rows.weight."""
    return name.removesuffix(".weight") + ".rows.weight"


def packed_shape(name: str, shape) -> tuple[int, int]:
    """The (rows, cols) a parameter of HF shape `shape` has in a pack."""
    rows, cols = shape
    return (cols, rows) if name.endswith(TRANSPOSED) else (rows, cols)


def role_of(name: str) -> str | None:
    """Which kind of matrix a parameter is ("ffn", "attention", "predictor", "lm_head"), or None
    for what stays as loaded (embeddings, norms, biases, and a MoE layer's router `mlp.gate`,
    a few rows whose softmax picks the experts)."""
    if not name.endswith(".weight") or "norm" in name.rsplit(".", 2)[-2] or name.endswith(".mlp.gate.weight"):
        return None
    if name == "lm_head.weight":
        return "lm_head"
    for part, role in ((".predictor.", "predictor"), (".mlp.", "ffn"), (".self_attn.", "attention")):
        if part in name:
            return role
    return None


def format_of(name: str, quant: str) -> str | None:
    """The block format of parameter `name` in a `quant` pack, None where it stays as loaded."""
    role = role_of(name)
    return None if role is None else FORMATS[quant][role]


def checkpoint_matrices(name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """A checkpoint tensor under the names a pack quantizes by: the module tree's (Mixtral's
    `block_sparse_moe` is `mlp`), and one (out, in) matrix per expert where transformers stores
    a layer's experts fused, as views:

        mlp.experts.gate_up_proj (E, 2I, H)  -> mlp.experts.{e}.w1.weight (I, H), w3 (I, H)
        mlp.experts.down_proj (E, H, I)      -> mlp.experts.{e}.w2.weight (H, I)

    (the published per-expert names, w1 the gate, w3 up, w2 down). t may be on the meta device."""
    name = name.replace(".block_sparse_moe.", ".mlp.")
    prefix, _, last = name.rpartition(".")
    if t.dim() != 3 or not prefix.endswith(".mlp.experts") or last not in ("gate_up_proj", "down_proj"):
        return [(name, t)]
    if last == "down_proj":
        return [(f"{prefix}.{e}.w2.weight", t[e]) for e in range(t.size(0))]
    gates_ups = (t[e].chunk(2, dim=0) for e in range(t.size(0)))  # gate rows first
    return [(f"{prefix}.{e}.{w}.weight", m) for e, pair in enumerate(gates_ups) for w, m in zip(("w1", "w3"), pair)]


Weight = torch.Tensor | QWeight  # what the kernels take as a matrix


def is_blocks(w: Weight) -> bool:
    """Whether w is held as blocks (a QWeight) rather than a tensor: the one test of a weight's
    kind, made where kernels are bound to weights (Kernels.for_weights), never per call."""
    return isinstance(w, QWeight)


def blocks_of(w: torch.Tensor) -> torch.Tensor:
    """w (N, H) as fp32 blocks (N, B, 32), the last block padded with zeros."""
    n, h = w.shape
    pad = -h % BLOCK
    w = w.float()
    if pad:
        w = torch.cat((w, w.new_zeros(n, pad)), dim=1)
    return w.view(n, -1, BLOCK)


def fp16_bytes(v: torch.Tensor) -> torch.Tensor:
    """fp32 (N, B) -> its fp16 bits as bytes (N, B, 2)."""
    return v.half().unsqueeze(-1).view(torch.uint8)


def quantize(w: torch.Tensor, fmt: str, chunk_rows: int = 1024) -> QWeight:
    """W (N, H) float -> QWeight, `chunk_rows` rows at a time (so that the fp32 temporaries stay
    a few MB above the result), with llama.cpp's reference rounding (quantize_row_q8_0_ref,
    quantize_row_q4_0_ref, as gguf's numpy quantizer writes them): the scale from fp32, stored
    as fp16; int4's q = min(15, trunc(x / d + 8.5)), the value opposite the block's extreme
    clamped to 15 (one step off, where the others are half a step at most)."""
    if fmt not in QUANTS:
        raise ValueError(f"unknown quantization {fmt!r}; one of {', '.join(QUANTS)}")
    n, h = w.shape
    out = torch.empty((n, -(-h // BLOCK) * BLOCK_BYTES[fmt]), dtype=torch.uint8)
    for r in range(0, n, chunk_rows):
        x = blocks_of(w[r : r + chunk_rows].detach().cpu())  # (n, B, 32)
        if fmt == "int8":
            d = x.abs().amax(-1) / 127
            inv = torch.where(d > 0, 1 / d, 0)
            # rounded half away from zero, as roundf (torch.round: half to even), in exact steps
            a = (x * inv[..., None]).abs()
            whole = a.floor()
            v = (x.sign() * (whole + (2 * (a - whole)).floor())).clamp(-127, 127)
            q = v.to(torch.int8).view(torch.uint8)
            parts: tuple[torch.Tensor, ...] = (fp16_bytes(d), q)
        else:
            extreme = x.gather(-1, x.abs().argmax(-1, keepdim=True))  # the first of largest |x|
            d = extreme / -8
            inv = torch.where(d != 0, 1 / d, 0)
            q = (x * inv + 8.5).trunc().clamp(0, 15).to(torch.uint8)
            parts = (fp16_bytes(d.squeeze(-1)), q[..., :16] | (q[..., 16:] << 4))
        out[r : r + chunk_rows] = torch.cat(parts, dim=-1).view(x.size(0), -1)
    return QWeight(out.to(w.device), fmt, h)


def dequantize(w: QWeight, idx: torch.Tensor | None = None) -> torch.Tensor:
    """The rows idx (k,) of w (every row when None) as fp32 (k, H)."""
    data = w.data if idx is None else w.data.index_select(0, idx)
    size = BLOCK_BYTES[w.fmt]
    blocks = data.view(data.size(0), data.size(1) // size, size)  # (k, B, block bytes)
    d = blocks[..., 0:2].contiguous().view(torch.float16).float()  # (k, B, 1)
    if w.fmt == "int8":
        values = d * blocks[..., 2:].contiguous().view(torch.int8).float()
    else:
        nibbles = blocks[..., 2:]
        q = torch.cat((nibbles & 15, nibbles >> 4), dim=-1).float()
        values = d * (q - 8)
    return values.reshape(data.size(0), values.size(1) * BLOCK)[:, : w.cols]


def quantize_activation(x: torch.Tensor) -> torch.Tensor:
    """x (..., H) -> dequantize(Q8_0(x)) in fp32: per block of 32, d = amax / 127 (fp32, not
    rounded to fp16), q = round_half_even(x * (1 / d)); the value the integer kernels see."""
    h = x.size(-1)
    pad = -h % BLOCK
    xb = torch.nn.functional.pad(x.float(), (0, pad)).view(*x.shape[:-1], -1, BLOCK)
    d = xb.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, 0)
    q = (xb * inv).round().clamp(-127, 127)
    return (d * q).view(*x.shape[:-1], -1)[..., :h]


def q_rows_dot(w: QWeight, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
    """y_j = dequantize(W)[idx_j] . quantize_activation(x), in fp32, rounded to x's dtype."""
    return (dequantize(w, idx) @ quantize_activation(x)).to(x.dtype)


def q_rows_axpy(wt: QWeight, h: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
    """y = sum_j h_j dequantize(Wt)[idx_j] (h unquantized), in fp32, rounded to h's dtype."""
    return (h.float() @ dequantize(wt, idx)).to(h.dtype)


def block_nbytes(shape, fmt: str) -> int:
    """Bytes of an (N, H) matrix quantized in `fmt`."""
    n, h = shape
    return n * -(-h // BLOCK) * BLOCK_BYTES[fmt]


def weight_bytes(w: Weight) -> int:
    """Bytes a weight (tensor or QWeight) occupies, which a dense pass over it reads."""
    return w.nbytes


def row_bytes(w: Weight) -> int:
    """Bytes of one row of a weight (tensor or QWeight): its rows are all alike."""
    return w.nbytes // w.size(0)
