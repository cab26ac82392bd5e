"""Where the project's files live: the shipped assets, and the on-disk cache (never in git)."""

import json
import os
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
MODELS_DIR = ASSETS / "models"
# The embedded models (offline/train.py trains them; the app offers them; the bench runs them)
DENSE_MODEL = MODELS_DIR / "dense-swiglu"
DRELU_MODEL = MODELS_DIR / "turbosparse-drelu"
RELUFIED_MODEL = MODELS_DIR / "turbosparse-relufied"
MOE_DENSE_MODEL = MODELS_DIR / "moe-dense-swiglu"
MOE_DRELU_MODEL = MODELS_DIR / "moe-turbosparse-drelu"


def cache_dir() -> Path:
    """Tokenized corpora and the C++ kernel builds: $TURBO_DEMO_CACHE or ~/.cache/turbo_demo."""
    path = Path(os.environ.get("TURBO_DEMO_CACHE", Path.home() / ".cache" / "turbo_demo"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def read_json(path: Path) -> dict | None:
    """A JSON file that a command of this project wrote next to a model, or None."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def bench_results() -> dict | None:
    """assets/bench.json: the `bench --json` run the app and README quote, or None."""
    return read_json(ASSETS / "bench.json")


def eval_results(model_dir: Path) -> dict | None:
    """A model's eval.json (`eval DIR --json`, written beside its weights), or None."""
    return read_json(model_dir / "eval.json")
