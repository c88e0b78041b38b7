"""Where models come from: the bundled demo model, a local folder, or the Hugging Face Hub.

Downloads happen only when the caller says so (``allow_download``), into a user cache folder
that survives upgrades (``$CTMLLM_CACHE`` or ``~/.cache/ctmllm``), and only safetensors and
config/tokenizer files are fetched. A spec that reads as a path (``./x``, ``models/ct3d`` when
``models/`` exists, ``a/b/c``, ``~/x``) is never sent to the Hub: when it does not exist, the
error says so. Importing this module needs neither torch nor transformers (the Slicer module's
Logic asks ``looks_like_hub_repo_id`` before they are installed).
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from model_core.model import CTMLLM

DEMO_SPEC = "demo"
DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo_model"
"""Where the bundled demo model is assembled (see docs/MODEL_CARD.md)."""

CONFIG_FILE = "ctmllm_config.json"
"""The file that makes a folder a CTMLLM model folder (``model_core.model`` writes it)."""

HUB_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
"""``owner/name``: what is not a local path and looks like this may be looked up on the Hub."""


class ModelNotFoundError(FileNotFoundError):
    """No model at the given spec; the message says what was tried and what to do."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("CTMLLM_CACHE", Path.home() / ".cache" / "ctmllm"))


def looks_like_hub_repo_id(spec: str | os.PathLike) -> bool:
    """True when ``spec`` can only be a Hub repo id: ``owner/name``, not an existing path, and not
    written as a path (leading ``.``, ``/`` or ``~``, backslashes, more than one ``/``, a trailing
    ``/``, or a first part that is a local folder, as in ``models/ct3d`` beside a ``models`` folder)."""
    text = str(spec)
    if not HUB_REPO_ID.fullmatch(text) or os.path.exists(os.path.expanduser(text)):
        return False
    return not os.path.isdir(text.split("/", 1)[0])


def tiny_fallback_dir(cache_dir: Path | None = None) -> Path:
    """A tiny random model in the cache, standing in while no demo model is installed."""
    folder = (cache_dir or default_cache_dir()) / "tiny-internvl-random"
    if not (folder / CONFIG_FILE).is_file():
        from model_core.tiny import build_tiny_ctmllm

        build_tiny_ctmllm("internvl").save_pretrained(folder)
    return folder


def resolve_model_dir(
    spec: str | os.PathLike = DEMO_SPEC,
    cache_dir: str | os.PathLike | None = None,
    allow_download: bool = False,
    notice: Callable[[str], None] = print,
) -> Path:
    """Turn ``"demo"``, a folder, or a Hub repo id into a local CTMLLM folder."""
    cache = Path(cache_dir) if cache_dir else None
    if str(spec) == DEMO_SPEC:
        if (DEMO_MODEL_DIR / CONFIG_FILE).is_file():
            return DEMO_MODEL_DIR
        notice(
            "The trained demo model is not installed; using the tiny random test model instead. "
            "Its text is meaningless: it only shows that the pipeline runs."
        )
        return tiny_fallback_dir(cache)
    folder = Path(spec).expanduser()
    if folder.is_dir():
        if not (folder / CONFIG_FILE).is_file():
            raise ModelNotFoundError(
                f"{folder} is not a CTMLLM model folder (no {CONFIG_FILE}); convert a 2D checkpoint with "
                f"`python -m model_core convert`"
            )
        return folder
    if folder.exists():
        raise ModelNotFoundError(f"model {folder} is a file; pass the model's folder")
    if not looks_like_hub_repo_id(spec):
        raise ModelNotFoundError(
            f"model folder {folder} does not exist (looked in {folder.absolute().parent}): check the path"
        )
    return _from_hub(str(spec), cache or default_cache_dir(), allow_download)


def _from_hub(repo_id: str, cache: Path, allow_download: bool) -> Path:
    """A Hub repo from the local cache, or downloaded when allowed; errors say which and why."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    from model_core.model_files import HUB_FILE_PATTERNS

    fetch = dict(cache_dir=str(cache), allow_patterns=HUB_FILE_PATTERNS)
    try:  # a repo downloaded before loads offline, without asking again
        return Path(snapshot_download(repo_id, local_files_only=True, **fetch))
    except LocalEntryNotFoundError:
        pass
    if not allow_download:
        raise ModelNotFoundError(
            f"{repo_id!r} is not a local folder; downloading it from the Hugging Face Hub needs your "
            f"agreement (allow_download=True / --allow-download). If you meant a folder, check the path."
        )
    try:
        return Path(snapshot_download(repo_id, **fetch))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as error:
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise ModelNotFoundError(
            f"{repo_id!r} could not be downloaded from the Hugging Face Hub ({first}): check the repo id and the "
            "network, or pass a local model folder"
        ) from error


def pick_device(device: str = "auto") -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError("a GPU was requested but torch sees no CUDA device: choose cpu or auto")
    if device not in ("gpu", "cuda", "cpu"):
        raise ValueError(f"device {device!r}: choose auto, cpu or cuda")
    return torch.device("cuda" if device == "gpu" else device)


def add_precision_option(parser: argparse.ArgumentParser) -> None:
    """``--precision``, as the CLI, the evaluation and the batch script offer it (``load_model``'s ``dtype``)."""
    parser.add_argument(
        "--precision",
        default="auto",
        help="auto, float32, bfloat16, float16 or int8 (CPU: the language model in int8)",
    )


def pick_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in names:
        raise ValueError(f"precision {dtype!r}: choose auto, float32, bfloat16, float16 or int8")
    return names[dtype]


def load_model(
    spec: str | os.PathLike = DEMO_SPEC,
    device: str = "auto",
    dtype: str | torch.dtype = "auto",
    cache_dir: str | os.PathLike | None = None,
    allow_download: bool = False,
    notice: Callable[[str], None] = print,
) -> CTMLLM:
    """Load a CTMLLM from ``spec`` on the chosen device and precision (``"int8"``: float32 on the
    CPU with the language model's linears dynamically quantised, ``model_core.int8``).

    Raises ``ModelNotFoundError`` (no such model), ``model_core.config.ConfigError`` (its config
    file holds a wrong value) or ``model_core.model.ModelLoadError`` (weights or tokenizer missing,
    unreadable or damaged), each naming the file or field and the fix.
    """
    import torch

    from model_core.int8 import INT8, quantize_language_model
    from model_core.model import CTMLLM

    folder = resolve_model_dir(spec, cache_dir, allow_download, notice)
    target = pick_device("cpu" if dtype == INT8 and device == "auto" else device)
    if dtype == INT8:  # float32 weights, then the language model's linears in int8 (CPU only)
        return quantize_language_model(CTMLLM.from_pretrained(folder, device=target, dtype=torch.float32))
    return CTMLLM.from_pretrained(folder, device=target, dtype=pick_dtype(dtype, target))
