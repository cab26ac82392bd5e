"""One training loop for the three presets of the embedded models.

    dense   MistralForCausalLM, SwiGLU FFN, from scratch
    drelu   BambooForCausalLM, dReLU FFN, from scratch, same shape, data order and budget,
            plus a ProSparse-style L1 penalty on the combined activation h (0 = plain dReLU)
    relufy  starts from a dense checkpoint, swaps SwiGLU for dReLU and continues training
    moe-dense  MixtralForCausalLM, SwiGLU experts (8, top-2), from scratch, MoEShape
    moe-drelu  TurboSparseMixtralForCausalLM, dReLU experts, same shape, data order and budget,
               with the drelu preset's L1 penalty (on each expert's h, over its routed tokens)

Loss = cross-entropy + l1 * ramp(step) * sum over layers of mean over tokens of sum_i |h_i|,
where ramp rises linearly from 0 to 1 over the first `l1_ramp` share of steps; MoE presets add
`router_loss` times Mixtral's load-balancing loss, so that every expert gets tokens. AdamW
(0.9, 0.95), linear warm-up then cosine decay to `min_lr`. Everything random comes from `seed`.
"""

import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

from turbo_demo.checkpoints.checkpoint import load_model, load_tokenizer, save_checkpoint
from turbo_demo.errors import UserError
from turbo_demo.models.bamboo import BambooConfig, BambooForCausalLM, swiglu_to_drelu
from turbo_demo.models.hooks import on_ffn_activation
from turbo_demo.models.mixtral import TurboSparseMixtralConfig, TurboSparseMixtralForCausalLM
from turbo_demo.offline import corpus
from turbo_demo.paths import DENSE_MODEL


@dataclass
class Shape:
    """The embedded models' shape: a wide FFN (5x hidden) so that the FFN dominates decoding."""

    hidden_size: int = 256
    intermediate_size: int = 1280
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    vocab_size: int = 4096
    max_position_embeddings: int = 512


@dataclass
class MoEShape(Shape):
    """The embedded MoE pair's shape: 8 experts of 128 neurons, top-2, at half the hidden size
    (the repository's size budget: 2.3M parameters, 4.6 MB in fp16, per model)."""

    hidden_size: int = 128
    intermediate_size: int = 128  # per expert
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    num_local_experts: int = 8
    num_experts_per_tok: int = 2


@dataclass
class TrainSettings:
    preset: str
    steps: int = 1200
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup: int = 100
    weight_decay: float = 0.1
    l1: float = 0.0
    l1_ramp: float = 0.3
    eval_every: int = 100
    eval_tokens: int = 32768
    seed: int = 0
    init: str | None = None
    router_loss: float = 0.0


PRESETS = {
    "dense": TrainSettings("dense"),
    "drelu": TrainSettings("drelu", l1=3e-4),
    "relufy": TrainSettings(
        "relufy",
        steps=400,
        lr=6e-4,
        min_lr=1e-4,
        warmup=20,
        l1=1e-3,
        init=str(DENSE_MODEL),
    ),
    "moe-dense": TrainSettings("moe-dense", router_loss=0.02),
    "moe-drelu": TrainSettings("moe-drelu", l1=3e-4, router_loss=0.02),
}
SHAPES = {"moe-dense": MoEShape, "moe-drelu": MoEShape}


def settings_for(preset: str, **overrides) -> TrainSettings:
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})


def lr_at(step: int, s: TrainSettings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.min_lr + 0.5 * (s.lr - s.min_lr) * (1 + math.cos(math.pi * progress))


def build_model(s: TrainSettings, tokenizer, shape: Shape):
    """A freshly initialised model for dense/drelu, or the ReLUfied dense checkpoint."""
    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        sliding_window=None,
    )
    torch.manual_seed(s.seed)
    if s.preset == "dense":
        return MistralForCausalLM(MistralConfig(**asdict(shape), hidden_act="silu", **ids))
    if s.preset == "drelu":
        return BambooForCausalLM(BambooConfig(**asdict(shape), hidden_act="relu", **ids))
    if s.preset == "moe-dense":
        return MixtralForCausalLM(MixtralConfig(**asdict(shape), hidden_act="silu", **ids))
    if s.preset == "moe-drelu":
        return TurboSparseMixtralForCausalLM(TurboSparseMixtralConfig(**asdict(shape), hidden_act="relu", **ids))
    dense = load_model(s.init)
    if not isinstance(dense, MistralForCausalLM) or isinstance(dense, BambooForCausalLM):
        raise UserError(f"relufy needs a dense Mistral (SwiGLU) checkpoint; {s.init} is not one")
    return swiglu_to_drelu(dense)


def batch_loss(model, x, y, router_loss: float = 0.0):
    """Cross-entropy of next tokens; with router_loss, also (MoE models) the load-balancing loss."""
    out = model(input_ids=x, use_cache=False, **({"output_router_logits": True} if router_loss else {}))
    ce = F.cross_entropy(out.logits.reshape(-1, out.logits.size(-1)), y.reshape(-1))
    return (ce, out.aux_loss) if router_loss else ce


@torch.no_grad()
def heldout_loss(model, tokens: torch.Tensor, s: TrainSettings) -> float:
    model.eval()
    losses = [
        batch_loss(model, x, y).item()
        for x, y in corpus.sequential_batches(tokens, s.batch_size, s.seq_len, s.eval_tokens)
    ]
    model.train()
    return sum(losses) / len(losses)


def train_step(model, opt, x, y, l1: float, router_loss: float = 0.0) -> tuple[float, float | None]:
    """One optimizer step on (x, y) with an L1 weight; returns (cross-entropy, FFN sparsity).

    Sparsity here is the share of exactly-zero h over all layers, tokens and neurons (in a MoE
    model, over the tokens each expert was routed); None for transformers' Mixtral, which is not
    watched: its experts are fused, so watching them recomputes every expert (models/hooks.py),
    and SwiGLU is never exactly zero.
    """
    penalties, zeros = [], []

    def watch(layer, h):
        penalties.append(h.abs().sum(-1).mean())
        zeros.append((h.detach() == 0).float().mean())

    watching = nullcontext() if type(model) is MixtralForCausalLM else on_ffn_activation(model, watch)
    with watching:
        ce = batch_loss(model, x, y, router_loss)
    ce, aux = ce if router_loss else (ce, None)
    loss = ce + l1 * torch.stack(penalties).sum() if l1 else ce
    if aux is not None:
        loss = loss + router_loss * aux
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return ce.item(), torch.stack(zeros).mean().item() if zeros else None


def make_optimizer(model, s: TrainSettings) -> torch.optim.AdamW:
    """AdamW (0.9, 0.95); weight decay on matrices only, not on norms."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=s.lr,
        betas=(0.9, 0.95),
    )


def train(s: TrainSettings, out: str | Path, shape: Shape | None = None) -> dict:
    """Train one preset and write the checkpoint plus training_log.json into `out`."""
    shape = shape or SHAPES.get(s.preset, Shape)()
    out = Path(out)
    tokenizer = load_tokenizer(s.init) if s.preset == "relufy" else corpus.train_tokenizer(shape.vocab_size)
    train_tokens = corpus.encode_split(tokenizer, "train")
    val_tokens = corpus.encode_split(tokenizer, "heldout")
    model = build_model(s, tokenizer, shape).train()
    opt = make_optimizer(model, s)
    gen = torch.Generator().manual_seed(s.seed)
    log = {
        "preset": s.preset,
        "settings": asdict(s),
        "shape": {k: getattr(model.config, k) for k in asdict(shape)},
        "architecture": type(model).__name__,
        "hidden_act": model.config.hidden_act,
        "threads": torch.get_num_threads(),
        "steps": [],
    }
    start = time.time()
    with tqdm(range(s.steps), desc=f"train {s.preset}") as bar:
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, s)
            x, y = corpus.random_batch(train_tokens, s.batch_size, s.seq_len, gen)
            ramp = min(1.0, step / max(1, s.l1_ramp * s.steps))
            ce, sparsity = train_step(model, opt, x, y, s.l1 * ramp, s.router_loss)
            bar.set_postfix(loss=f"{ce:.3f}", sparsity="-" if sparsity is None else f"{sparsity:.3f}")
            last = step == s.steps - 1
            if step % 10 == 0 or last:
                entry = {
                    "step": step,
                    "tokens": (step + 1) * s.batch_size * s.seq_len,
                    "train_loss": round(ce, 4),
                    "sparsity": None if sparsity is None else round(sparsity, 4),
                    "lr": lr_at(step, s),
                    "elapsed_s": round(time.time() - start, 1),
                }
                if step % s.eval_every == 0 or last:
                    entry["val_loss"] = round(heldout_loss(model, val_tokens, s), 4)
                log["steps"].append(entry)
                out.mkdir(parents=True, exist_ok=True)
                (out / "training_log.json").write_text(json.dumps(log, indent=1))
    model.eval()
    save_checkpoint(model, tokenizer, out)
    log["final"] = log["steps"][-1]
    (out / "training_log.json").write_text(json.dumps(log, indent=1))
    return log
