"""Train the byte-level BPE tokenizer of the pair and write it as Hugging Face tokenizer files.

Digits are split one by one before BPE (as Qwen2 does), so arithmetic and ids are learnt per digit instead of as
thousands of arbitrary number tokens. The chat special tokens and tool tags are added tokens: one id each, never
split, in a fixed order at the start of the vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from specrelay.models.chat_template import CHAT_TEMPLATE, EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, TOOL_TOKENS

MAX_LENGTH = 4096


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A `tokenizers.Tokenizer` trained on `texts`; ids 0..6 are the special tokens then the tool tags."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
        + [AddedToken(t, special=False, normalized=False) for t in TOOL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # The trainer registers every added token as special; the tool tags must survive skip_special_tokens decoding.
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TOKENS])
    return tokenizer


def tokenizer_config(tokenizer) -> dict:
    added = {}
    for token in SPECIAL_TOKENS + TOOL_TOKENS:
        added[str(tokenizer.token_to_id(token))] = {
            "content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": token in SPECIAL_TOKENS}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_LENGTH,
        "chat_template": CHAT_TEMPLATE,
    }


def save_tokenizer(tokenizer, directory: Path) -> None:
    """tokenizer.json + tokenizer_config.json (with the chat template) + special_tokens_map.json."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tokenizer), indent=2) + "\n")
    special_map = {"eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN,
                   "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}
    (directory / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
