"""Where the project's files live: the shipped assets, and the on-disk cache (never in git)."""

import json
import os
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
MODELS_DIR = ASSETS / "models"


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
