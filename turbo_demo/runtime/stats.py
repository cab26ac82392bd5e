"""Statistics of one decode step: one schema for the CLI's --json, the app's panels and tests.

Per layer and step, an FFN mode records:
    computed   neurons whose up/down rows were read (the predicted or gate-active set)
    active     neurons with a non-zero combined activation h among those computed
    bytes      FFN weight bytes read (gate, up, down and the predictor; a MoE layer's router)
and, where the step was audited against the dense FFN (predictor and threshold modes), the mode
measures after the step (Mode.recall; a MoE layer's: MoERecall):
    recall     share of the truly active neurons (h != 0 in the dense FFN) that were computed
Per neuron, over a generation, the runtime counts the steps in which it fired (h != 0 among the
neurons its mode computed; Decoder.firing_counts), in the kernels' own loops: the hot and cold
neurons of PowerInfer.
On request (the app's token inspector), each step also says what every neuron did, as codes:
    0  not fired (h == 0, or not computed; where audited, not active in the dense FFN either)
    1  fired (h != 0 among the computed neurons: for a mode that chooses, a true positive)
    2  computed but h == 0 (a mode that chooses: a false positive)
    3  missed: active in the dense FFN but not computed (audited steps only)
"""

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import torch

NOT_FIRED, FIRED, COMPUTED_ZERO, MISSED = range(4)
NEURON_CODES = ("not fired", "fired", "computed, h = 0", "missed")
SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)


@dataclass
class LayerRecord:
    """What one layer's FFN step did. choice = (x, idx), the step's input and the neurons it
    computed, is kept by the modes that can miss an active neuron, for the recall audit."""

    computed: int = 0
    active: int = 0
    bytes: int = 0
    choice: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    # a MoE layer (runtime/moe.py): the chosen experts (ascending), their routing weights, each
    # one's own record, and the bytes a dense MoE reads in this layer (router + chosen experts)
    experts: list[int] | None = None
    weights: list[float] | None = None
    parts: list["LayerRecord"] | None = field(default=None, repr=False)
    routed_bytes: int = 0


@dataclass(frozen=True)
class MoERecall:
    """An audited MoE layer's recall: `share` over all its chosen experts' neurons, and each
    chosen expert's own, in its record's `experts` order."""

    share: float
    experts: list[float]


Recall = float | MoERecall | None  # one layer's, as its mode's recall() measures it (None: unaudited)


def share(recall: Recall) -> float | None:
    """A layer's recall over all its neurons (a MoE layer's: over all its chosen experts')."""
    return recall.share if isinstance(recall, MoERecall) else recall


def moe_fields(records: list[LayerRecord], recalls: Sequence[Recall]) -> dict:
    """StepStats' MoE fields from a MoE model's layer records and recalls ({} for dense FFNs)."""
    if not records or records[0].experts is None:
        return {}
    return dict(
        experts=[r.experts for r in records],
        expert_weights=[r.weights for r in records],
        expert_recall=[
            c.experts if isinstance(c, MoERecall) else [None] * len(r.parts or ()) for r, c in zip(records, recalls)
        ],
        ffn_bytes_routed=sum(r.routed_bytes for r in records),
    )


@dataclass
class StepStats:
    """One generated token and what it cost; lists hold one value per layer."""

    step: int
    token: int
    time_s: float
    intermediate_size: int
    active_share: list[float] = field(default_factory=list)
    computed_share: list[float] = field(default_factory=list)
    false_positive_share: list[float] = field(default_factory=list)
    recall: list[float] | None = None
    ffn_bytes: int = 0
    ffn_bytes_dense: int = 0
    # MoE models, per layer: the chosen experts, their weights, each one's recall (where
    # audited); and the bytes a dense MoE reads (ffn_bytes_dense: a dense FFN of all experts)
    experts: list[list[int]] | None = None
    expert_weights: list[list[float]] | None = None
    expert_recall: list[list[float | None]] | None = None
    ffn_bytes_routed: int | None = None
    # (L, I) uint8 NEURON_CODES of the step, when the generation was asked for them
    codes: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def from_records(
        cls,
        step,
        token,
        time_s,
        records: list[LayerRecord],
        intermediate_size,
        dense_bytes,
        recalls: Sequence[Recall] | None = None,
    ) -> "StepStats":
        """The step's statistics from its layer records and, where it was audited, each layer's
        recall (recalls: one per layer; None: not audited). `recall` is set only where every
        layer has one."""
        n = intermediate_size
        recalls = [None] * len(records) if recalls is None else recalls
        audited = [s for s in map(share, recalls) if s is not None]
        return cls(
            step=step,
            token=token,
            time_s=time_s,
            intermediate_size=n,
            active_share=[r.active / n for r in records],
            computed_share=[r.computed / n for r in records],
            false_positive_share=[(r.computed - r.active) / max(1, r.computed) for r in records],
            recall=audited if len(audited) == len(records) else None,
            ffn_bytes=sum(r.bytes for r in records),
            ffn_bytes_dense=dense_bytes,
            **moe_fields(records, recalls),
        )

    @property
    def sparsity(self) -> float | None:
        """Mean share of FFN neurons with h == 0 over layers (as computed in this mode)."""
        if not self.active_share:
            return None
        return 1.0 - sum(self.active_share) / len(self.active_share)

    def to_dict(self) -> dict:
        return {**asdict(replace(self, codes=None)), "sparsity": self.sparsity}


def neuron_codes(fired: torch.Tensor, records: list[LayerRecord], truly: list | None) -> torch.Tensor:
    """Each neuron's NEURON_CODES value at one step, (L, I) uint8, from the neurons that fired
    (L, I) bool, the computed sets of the modes that choose (records' choice) and, where the
    step was audited, the dense FFN's active sets (truly, one (I,) bool or None per layer)."""
    codes = fired.to(torch.uint8)
    for layer, record in enumerate(records):
        if record.choice is None:
            continue
        computed = torch.zeros_like(fired[layer])
        computed[record.choice[1].long()] = True
        codes[layer][computed & ~fired[layer]] = COMPUTED_ZERO
        if truly is not None and truly[layer] is not None:
            codes[layer][truly[layer] & ~computed] = MISSED
    return codes


def pack_codes(codes: torch.Tensor) -> bytes:
    """(L, I) codes in 0..3 -> ceil(L * I / 4) bytes, four neurons a byte, first in the low bits."""
    flat = codes.flatten().to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-len(flat) % 4)]).view(-1, 4)
    return (flat << SHIFTS).sum(dim=1, dtype=torch.uint8).numpy().tobytes()


def unpack_codes(data: bytes, layers: int, neurons: int) -> list[list[int]]:
    """pack_codes' inverse: the (layers, neurons) codes as lists."""
    packed = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    flat = ((packed[:, None] >> SHIFTS) & 3).flatten()[: layers * neurons]
    return flat.view(layers, neurons).tolist()
