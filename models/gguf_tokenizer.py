"""tokenizer.json and tokenizer_config.json rebuilt from a GGUF file's `tokenizer.ggml.*` metadata, with `tokenizers`.

- `gpt2` (byte-level BPE: SmolLM, Qwen, Llama 3): the vocabulary and merges as written; the text is split before
  BPE by the rule `tokenizer.ggml.pre` names, the regexes of llama.cpp's llama-vocab.cpp for that name.
- `llama` (SentencePiece BPE: Llama 2, Mistral): merges rebuilt from the vocabulary, best score first (a split of a
  token into two tokens of the vocabulary is a merge that makes it), bytes of unknown characters via byte fallback.

Tokens the file marks CONTROL become special added tokens, USER_DEFINED ones plain added tokens (`<think>`), so
that both are matched whole in text, as llama.cpp does.
"""

from __future__ import annotations

from pathlib import Path

from specrelay.shared.errors import ModelLoadError

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types (gguf.TokenType)
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> the splits applied in order before byte-level BPE ("digits": each digit alone)
PRE_TOKENIZERS = {
    "default": [GPT2_SPLIT], "gpt2": [GPT2_SPLIT],
    "smollm": ["digits", GPT2_SPLIT],
    "llama-bpe": [LLAMA3_SPLIT], "llama3": [LLAMA3_SPLIT], "llama-v3": [LLAMA3_SPLIT], "smaug-bpe": [LLAMA3_SPLIT],
    "dbrx": [LLAMA3_SPLIT],
    "qwen2": [QWEN2_SPLIT], "deepseek-r1-qwen": [QWEN2_SPLIT],
}


def build_tokenizer(metadata: dict, path: Path):
    """A `tokenizers.Tokenizer` for the file's vocabulary."""
    model = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelLoadError(f"{path}: no tokenizer.ggml.tokens: the file carries no tokenizer")
    if model == "gpt2":
        tokenizer = _byte_level(metadata, tokens, path)
    elif model == "llama":
        tokenizer = _sentencepiece(metadata, tokens, path)
    else:
        raise ModelLoadError(f"{path}: tokenizer model {model!r} is not supported (supported: gpt2, llama)")
    _add_tokens(tokenizer, tokens, metadata.get("tokenizer.ggml.token_type") or [])
    return tokenizer


def _byte_level(metadata: dict, tokens: list[str], path: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ModelLoadError(f"{path}: tokenizer.ggml.pre {pre!r} (how text is split before BPE) is not supported "
                             f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges") or []]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    steps = [pre_tokenizers.Digits(individual_digits=True) if split == "digits"
             else pre_tokenizers.Split(Regex(split), behavior="isolated") for split in PRE_TOKENIZERS[pre]]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [*steps, pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece(metadata: dict, tokens: list[str], path: Path):
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = metadata.get("tokenizer.ggml.scores")
    if not scores or len(scores) != len(tokens):
        raise ModelLoadError(f"{path}: a SentencePiece vocabulary needs tokenizer.ggml.scores for every token")
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = []
    for token, i in vocab.items():
        pairs = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        merges += [(scores[i], vocab[a], vocab[b], a, b) for a, b in pairs]
    merges.sort(key=lambda m: (-m[0], m[1], m[2]))
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    tokenizer = Tokenizer(models.BPE(vocab, [(a, b) for *_, a, b in merges], fuse_unk=True, byte_fallback=True,
                                     unk_token=tokens[unk_id] if unk_id is not None else None))
    prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    tokenizer.normalizer = normalizers.Sequence(
        [*([normalizers.Prepend("\u2581")] if prefix else []), normalizers.Replace(" ", "\u2581")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
         *([decoders.Strip(" ", 1, 0)] if prefix else [])])
    return tokenizer


def _add_tokens(tokenizer, tokens: list[str], token_types: list[int]) -> None:
    from tokenizers import AddedToken

    control = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, token_types) if k == CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, token_types) if k == USER_DEFINED]
    tokenizer.add_special_tokens(control)
    tokenizer.add_tokens(user)


def tokenizer_config(metadata: dict, max_length: int) -> dict:
    tokens = metadata["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        index = metadata.get(f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token",
                                           metadata.get("tokenizer.ggml.model") == "llama")),
        "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
    }
    if metadata.get("tokenizer.chat_template"):
        config["chat_template"] = metadata["tokenizer.chat_template"]
    return config
