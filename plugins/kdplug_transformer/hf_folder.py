"""A local Hugging Face checkpoint folder: checked, and its tokenizer loaded (``transformers`` is
the optional extra ``kdplug[hf]``, imported only here and only when a folder is used).

Both the tokenizers (``tokenizer=hf:PATH``) and the models (``hf:PATH``) read folders through
this module, which imports neither of them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import kdplug


def require_transformers():
    try:
        import transformers
    except ImportError as exc:
        raise kdplug.KdplugError(
            "Hugging Face models need the optional dependency 'transformers': "
            "pip install 'kdplug[hf]'") from exc
    return transformers


def checkpoint_folder(path: Any) -> Path:
    """The folder as a Path; a clear error if it is missing or holds no config.json."""
    if path is None or str(path).strip() == "":
        raise kdplug.KdplugError("a Hugging Face model needs a local folder: hf:PATH")
    folder = Path(str(path)).expanduser()
    if not folder.exists():
        raise kdplug.KdplugError(
            f"Hugging Face checkpoint folder {str(folder)!r} does not exist (resolved: "
            f"{str(folder.resolve())!r}); kdplug loads local folders only and downloads nothing")
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise kdplug.KdplugError(
            f"{str(folder)!r} is not a Hugging Face checkpoint folder (no config.json in it); "
            f"save one with model.save_pretrained(PATH) and tokenizer.save_pretrained(PATH)")
    return folder


def load_hf_tokenizer(path: Any):
    folder = checkpoint_folder(path)
    transformers = require_transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # no tokenizer files, bad files
        raise kdplug.KdplugError(f"cannot load a tokenizer from {str(folder)!r}: "
                                 f"{type(exc).__name__}: {exc}") from exc
