"""Model folders on disk: which files a CTMLLM or 2D checkpoint folder holds, and reading them
with an error that names the file and the fix (``ModelLoadError``).

Why apart from ``model_core.model``: the batch script, the SR writer and the Slicer session ask
for a file name or check a folder without building a model, and this module imports neither
torch nor transformers until a function needs them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model_core.config import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

WEIGHTS_FILE = "model.safetensors"
HUB_FILE_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "tokenizer*"]
"""What a Hub download fetches: configs, safetensors weights, tokenizer files; never pickles or code."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
"""A model folder holds at least one of these; ``save_pretrained`` writes the first two."""


class ModelLoadError(Exception):
    """A model folder is incomplete or damaged; the message names the file and the fix."""


def mllm_config_from_dict(data: dict[str, Any]):
    """Rebuild a Hugging Face 2D MLLM config from its dict (no file, no remote code)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = data.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ConfigError(
            f"mllm_config.model_type={model_type!r} is not a model type this transformers release knows; "
            "supported 2D families are InternVL ('internvl') and LLaVA ('llava'): convert the checkpoint again"
        )
    try:
        return CONFIG_MAPPING[model_type].from_dict(data)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"mllm_config does not describe a {model_type} model ({error})") from error


def read_image_normalisation(folder: Path, family_defaults: tuple) -> tuple[tuple, tuple]:
    """The tower's input mean/std from ``preprocessor_config.json``, else the family's defaults."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            data = data.get("image_processor", data)
            if "image_mean" in data and "image_std" in data:
                return tuple(data["image_mean"]), tuple(data["image_std"])
    return family_defaults


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """The folder's own tokenizer; a missing or broken one is named as such (not "install sentencepiece")."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(
            f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}): copy the whole model folder, "
            "as save_pretrained wrote it"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as error:  # tokenizers, transformers and json raise many types for damaged files
        first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise ModelLoadError(
            f"{folder}: its tokenizer files cannot be loaded ({first}); copy the model folder again"
        ) from error


def checked_weights_file(folder: Path) -> Path:
    """``model.safetensors`` if it is there, readable and holds a safetensors header; else why not."""
    from safetensors import SafetensorError, safe_open

    from model_core.data.files import unreadable_reason

    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelLoadError(f"{folder} has no {WEIGHTS_FILE}: copy the whole model folder, weights included")
    reason = unreadable_reason(weights)
    if reason:
        raise ModelLoadError(
            f"{weights}: cannot be read: {reason}. Ask for read access, or copy the model folder"
        )
    if weights.stat().st_size == 0:
        raise ModelLoadError(f"{weights}: is empty (0 bytes); copy or download the model again")
    try:
        with safe_open(str(weights), framework="pt"):
            pass
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelLoadError(
            f"{weights}: is not a complete safetensors file ({error}); it is corrupt or truncated: copy or "
            "download the model again"
        ) from error
    return weights
