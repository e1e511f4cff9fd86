"""`import_gguf(FILE.gguf, OUT_DIR)`: a GGUF file (llama.cpp's format) as a Hugging Face model directory.

OUT_DIR gets model.safetensors (float32: every quantized type dequantized exactly, nothing rounded again),
config.json, generation_config.json, tokenizer.json and tokenizer_config.json (with the chat template). Read with
the `gguf` library (llama.cpp's own Python package); the pieces live in gguf_tensors.py, gguf_config.py and
gguf_tokenizer.py. The directory is written beside OUT_DIR and renamed into place, so a reader never sees half of it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from specrelay.shared.errors import ModelLoadError


def read_gguf(path: Path):
    """(reader, metadata as plain Python values) of a GGUF file; a file that is not one is a ModelLoadError."""
    from gguf import GGUFReader

    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file")
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError, KeyError, IndexError) as e:
        raise ModelLoadError(f"{path}: not a readable GGUF file ({e})") from None
    metadata = {}
    for key, field in reader.fields.items():
        try:
            metadata[key] = field.contents()
        except (ValueError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{path}: metadata {key!r} cannot be read ({e})") from None
    return reader, metadata


def import_gguf(gguf_path: str | Path, out_dir: str | Path, sampling: dict | None = None) -> Path:
    """Write the HF directory of `gguf_path` at `out_dir` (which must not exist, or be empty); returns it.
    `sampling`: generation_config.json settings that override the file's (a built-in model's recommendation)."""
    from safetensors.torch import save_file

    from specrelay.models.gguf_config import architecture, build_config, generation_config
    from specrelay.models.gguf_tensors import read_tensors
    from specrelay.models.gguf_tokenizer import build_tokenizer, tokenizer_config
    from specrelay.shared.modeling.config import ModelConfig

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ModelLoadError(f"{out_dir}: exists and is not an empty directory (the import writes a new one)")
    reader, metadata = read_gguf(gguf_path)
    arch = architecture(metadata, gguf_path)
    config = build_config(metadata, {t.name for t in reader.tensors}, gguf_path)
    cfg = ModelConfig.from_dict(config, source=f"{gguf_path} (metadata)")
    tokenizer = build_tokenizer(metadata, gguf_path)
    tensors = read_tensors(reader, gguf_path, arch, cfg.num_heads, cfg.num_kv_heads)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the model from other users of a shared cache
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt", "source": gguf_path.name})
        _write_json(staging / "config.json", config)
        _write_json(staging / "generation_config.json", {**generation_config(metadata), **(sampling or {})})
        _write_json(staging / "tokenizer_config.json", tokenizer_config(metadata, cfg.max_position_embeddings))
        tokenizer.save(str(staging / "tokenizer.json"))
        if out_dir.is_dir():
            out_dir.rmdir()  # empty (checked above): rename() onto it would fail with ENOTEMPTY otherwise
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
