"""Fitting a low-rank predictor to one FFN's activity, shared by the per-layer predictors
(predictors.py) and the per-expert ones (moe_predictors.py): train on (input, label) pairs,
calibrate its threshold to a target recall on held-out pairs, and store the weights in place."""

import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from turbo_demo.models.bamboo import BambooPredictor

SEQ_LEN = 256  # tokens per sequence of the collected activations


class hook_input:
    """Context manager: fn(input) for every call of `module`, removed on exit."""

    def __init__(self, module, fn):
        self.module, self.fn = module, fn

    def __enter__(self):
        self.handle = self.module.register_forward_pre_hook(lambda m, args: self.fn(args[0]))

    def __exit__(self, *exc):
        self.handle.remove()


def train_layer(r, y, rank: int, steps: int, seed: int, batch_size: int = 1024) -> BambooPredictor:
    """Fit one layer's predictor on residuals r (n, H) and labels y (n, I)."""
    torch.manual_seed(seed)
    pred = BambooPredictor(r.size(1), rank, y.size(1))
    opt = torch.optim.AdamW(pred.parameters(), lr=3e-3, weight_decay=0.0)
    pos = y.float().mean().clamp(1e-4, 1 - 1e-4)
    pos_weight = torch.tensor(math.sqrt((1 - pos) / pos))
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 3e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(0, len(r), (batch_size,), generator=gen)
        loss = F.binary_cross_entropy_with_logits(pred(r[idx]), y[idx].float(), pos_weight=pos_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return pred.eval()


@torch.no_grad()
def calibrate(pred: BambooPredictor, r, y, target_recall: float) -> dict:
    """The highest threshold whose recall on (r, y) is >= target_recall, and its statistics
    (threshold 0 and no statistics where there are no tokens: a MoE expert that none reached)."""
    if not len(r):
        return {"threshold": 0.0, "recall": None, "predicted_sparsity": None, "true_sparsity": None}
    scores = pred(r)
    truly = scores[y]  # scores of the truly active neurons, over every held-out token
    # the (k+1)-th smallest of them, k = floor((1 - target) n): at least target * n are >= it
    k = int((1 - target_recall) * len(truly))
    threshold = min(0.0, float(torch.kthvalue(truly, k + 1).values)) if len(truly) else 0.0
    return {"threshold": round(threshold, 4), **choice_stats(scores, y, threshold)}


def choice_stats(scores: torch.Tensor, y: torch.Tensor, threshold: float) -> dict:
    """For predictor scores (n, I) and labels y (n, I): recall (share of the truly active
    predicted active, score >= threshold), predicted and true sparsity, rounded to 4 places."""
    predicted = scores >= threshold
    recall = (predicted & y).sum().item() / max(1, y.sum().item())
    return {
        "recall": round(recall, 4),
        "predicted_sparsity": round(1 - predicted.float().mean().item(), 4),
        "true_sparsity": round(1 - y.float().mean().item(), 4),
    }


def save_weights_in_place(model, path: Path, dtype) -> None:
    """Rewrite config.json and the weights of `path` in `dtype`, never leaving a half-written file;
    weight files of the old layout that the new one does not have (other shards, an index) go."""
    dtype = getattr(torch, str(dtype).removeprefix("torch.")) if dtype else torch.float16
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        model.to(dtype).save_pretrained(tmp)
        model.to(torch.float32)
        written = set(os.listdir(tmp))
        for name in written:
            os.replace(Path(tmp) / name, path / name)
    for old in [*path.glob("*.safetensors"), *path.glob("*.safetensors.index.json")]:
        if old.name not in written:
            old.unlink()
    shutil.rmtree(path / "__pycache__", ignore_errors=True)
