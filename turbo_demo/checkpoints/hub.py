"""A Hugging Face hub id (`org/name`) as a local checkpoint directory, downloaded once.

Only what the app loads is fetched (configs, safetensors weights and their index, tokenizer
files, chat template): never `*.bin` pickles, never Python files, and `trust_remote_code` stays
off. A model already in the local hub cache loads offline; otherwise, without a network (or with
HF_HUB_OFFLINE=1), the error says so in one line.
"""

import re
from collections.abc import Callable
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)

from turbo_demo.errors import UserError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
ALLOW = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]


def is_hub_id(text: str) -> bool:
    """Whether text reads as `org/name` (and not as a path: no leading '/', '.' or '~')."""
    return bool(HUB_ID.match(text)) and ".." not in text


def progress_class(on_progress: Callable[[str], None]):
    """A tqdm class that reports each file's progress as one line through on_progress."""
    from tqdm.auto import tqdm

    class Reporting(tqdm):
        def update(self, n=1):
            super().update(n)
            if self.total:
                on_progress(f"Downloading {self.desc or 'files'}: {self.n / self.total:.0%}")

    return Reporting


def fetch(repo_id: str, on_progress: Callable[[str], None] | None = None) -> Path:
    """The local snapshot directory of repo_id: from the cache, else downloaded (with progress)."""
    try:
        return Path(snapshot_download(repo_id, allow_patterns=ALLOW, local_files_only=True))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, FileNotFoundError):
        if constants.HF_HUB_OFFLINE:
            raise UserError(
                f"{repo_id} is not in the local hub cache, and HF_HUB_OFFLINE is set: unset it to download, "
                "or give the model's directory"
            ) from None
    if on_progress is not None:
        on_progress(f"Downloading {repo_id} from the Hugging Face hub…")
    kwargs = {"tqdm_class": progress_class(on_progress)} if on_progress is not None else {}
    try:
        return Path(snapshot_download(repo_id, allow_patterns=ALLOW, **kwargs))
    except (OfflineModeIsEnabled, LocalEntryNotFoundError) as exc:
        raise UserError(
            f"{repo_id} is not in the local hub cache and the hub is not reachable from here (offline): "
            "download it where there is a network and give its directory"
        ) from exc
    except GatedRepoError as exc:
        raise UserError(f"{repo_id} is gated on the hub: accept its terms and log in (hf auth login)") from exc
    except RepositoryNotFoundError as exc:
        raise UserError(f"no model {repo_id!r} on the Hugging Face hub (or it is private)") from exc
    except OSError as exc:  # connection errors are OSErrors (requests / httpx)
        raise UserError(f"cannot download {repo_id} from the hub: {type(exc).__name__}: {exc}") from exc
