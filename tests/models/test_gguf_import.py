"""GGUF import: random tiny Llama / Qwen2 / Qwen3 models written by gguf's own writer in every type it can
quantize to (and the K-quants, as random blocks), imported, loaded by our runtime and compared with transformers
running the weights the file holds; the tokenizer and chat template rebuilt from the file; clear errors."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from specrelay.models.gguf_import import import_gguf
from specrelay.shared.errors import ModelLoadError
from specrelay.shared.modeling.kv_cache import BlockTable
from specrelay.shared.modeling.loader import load_model
from specrelay.shared.modeling.runner import ModelRunner, StepInput
from specrelay.shared.tokenizer import Tokenizer

from .gguf_files import K_QUANT_HALVES, write_gguf, writable_types

PAIR = Path(__file__).resolve().parents[2] / "models"
TYPES = [*writable_types(), *K_QUANT_HALVES]
# in_features a multiple of 256, the K-quants' (and TQ*'s) block; wide init for peaked logits
DIMS = dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2, eos_token_id=None)


def tiny_configs():
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    return {"llama": LlamaConfig(**DIMS, rope_theta=50000.0, rms_norm_eps=1e-5),
            "qwen2": Qwen2Config(**{**DIMS, "num_hidden_layers": 3}, tie_word_embeddings=True),  # 2-D weights >= types
            "qwen3": Qwen3Config(**DIMS, head_dim=128)}  # not hidden / heads


@pytest.fixture(scope="module")
def tiny_models():
    from transformers import AutoModelForCausalLM

    out = {}
    for i, (arch, cfg) in enumerate(tiny_configs().items()):
        torch.manual_seed(100 + i)
        out[arch] = AutoModelForCausalLM.from_config(cfg).eval()
    return out


def test_the_library_writes_the_types_the_issue_names():
    assert {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1} <= set(writable_types())
    assert {Q.Q4_K, Q.Q6_K} <= set(TYPES)


# Llama (q/k rows permuted in the file) in each type alone; each architecture in a file mixing every type.
CASES = [("llama", q) for q in TYPES] + [(arch, TYPES) for arch in ("llama", "qwen2", "qwen3")]


@pytest.mark.parametrize("arch,qtype", CASES,
                         ids=[f"{a}-{'mixed' if isinstance(q, list) else q.name}" for a, q in CASES])
def test_imported_model_matches_the_dequantized_weights(arch, qtype, tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_models[arch]
    path = tmp_path / f"tiny-{arch}.gguf"
    reference = write_gguf(path, model, arch, qtype, PAIR / "target")
    expected_model = AutoModelForCausalLM.from_config(model.config).eval()
    expected_model.load_state_dict(reference)
    ids = torch.randint(0, DIMS["vocab_size"], (40,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        expected = expected_model(torch.tensor([ids])).logits[0]

    out = import_gguf(path, tmp_path / "imported")
    runner = ModelRunner(load_model(out), num_blocks=8, block_size=16)
    logits = runner.forward([StepInput(BlockTable(), ids, logits_rows=list(range(len(ids))))])[0]
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max().item() <= 1e-4
    assert expected.std().item() > 0.5  # the comparison is not of near-zero logits


def test_config_comes_from_the_metadata(tiny_models, tmp_path):
    import json

    for arch in ("llama", "qwen2", "qwen3"):
        write_gguf(tmp_path / f"{arch}.gguf", tiny_models[arch], arch, Q.F32, PAIR / "target")
        out = import_gguf(tmp_path / f"{arch}.gguf", tmp_path / arch)
        config = json.loads((out / "config.json").read_text())
        hf = tiny_models[arch].config
        assert config["model_type"] == arch
        assert config["tie_word_embeddings"] == (arch == "qwen2")  # no output.weight in the file
        assert config["rope_theta"] == hf.rope_parameters["rope_theta"]
        assert config["rms_norm_eps"] == hf.rms_norm_eps  # written as float32, read back as the decimal
        assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
        assert config["head_dim"] == (128 if arch == "qwen3" else 64)
        assert config["max_position_embeddings"] == 512
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json",
                                                         "model.safetensors", "tokenizer.json",
                                                         "tokenizer_config.json"]


def test_tokenizer_and_chat_template_match_the_original(tiny_models, tmp_path):
    write_gguf(tmp_path / "t.gguf", tiny_models["llama"], "llama", Q.Q8_0, PAIR / "target")
    ours, original = Tokenizer(import_gguf(tmp_path / "t.gguf", tmp_path / "out")), Tokenizer(PAIR / "target")
    texts = ["Hello world", "In 2024 I paid $1,234.56 for 3 apples.", "  leading spaces\n\n\ttabs",
             "<tool_call>\n{\"name\": \"f\"}\n</tool_call>", "<|im_start|>user\nhi<|im_end|>", "naïve café 東京 🙂",
             "don't won't I'll we've", "x=[1,2,3]; print(sum(x))"]
    for text in texts:
        assert ours.encode(text) == original.encode(text), text
        assert ours.decode(ours.encode(text)) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    assert ours.apply_chat_template(messages) == original.apply_chat_template(messages)
    assert (ours.eos_token, ours.pad_token, ours.add_bos) == (original.eos_token, original.pad_token, False)
    assert ours.special_ids == original.special_ids


def _minimal(path: Path, arch: str, tensors: dict) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    for name, (data, raw_dtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_an_unsupported_architecture_is_named(tmp_path):
    import numpy as np

    path = _minimal(tmp_path / "phi.gguf", "phi3", {"token_embd.weight": (np.zeros((8, 4), np.float32), None)})
    with pytest.raises(ModelLoadError, match=r"phi\.gguf: GGUF architecture 'phi3' is not supported \(supported: "
                                             r"llama, qwen2, qwen3\)"):
        import_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("qtype", [Q.I32, Q.Q8_K], ids=lambda q: q.name)
def test_an_unsupported_tensor_type_is_named(qtype, tiny_models, tmp_path):
    import numpy as np

    path = tmp_path / "tiny.gguf"
    write_gguf(path, tiny_models["llama"], "llama", Q.F32, PAIR / "target")
    reader = gguf.GGUFReader(path)
    odd = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(odd), "llama")
    for key, field in reader.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            value_type = field.types[0]
            writer.add_key_value(key, field.contents(), value_type,
                                 sub_type=field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None)
    for tensor in reader.tensors:
        data, raw = np.array(tensor.data), None
        if tensor.name == "blk.1.ffn_up.weight":
            block_bytes = gguf.GGML_QUANT_SIZES[qtype][1] * data.shape[1] // gguf.GGML_QUANT_SIZES[qtype][0]
            data = np.zeros((data.shape[0], data.shape[1]), np.int32) if qtype == Q.I32 else np.zeros(
                (data.shape[0], block_bytes), np.uint8)
            raw = None if qtype == Q.I32 else qtype
        writer.add_tensor(tensor.name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match=rf"odd\.gguf: tensor 'blk\.1\.ffn_up\.weight' is of (integer )?type "
                                             rf"{qtype.name}.*supported: F32, F16"):
        import_gguf(odd, tmp_path / "out")


def test_the_cli_imports_and_reports_errors_in_one_line(tiny_models, tmp_path, capsys):
    from specrelay.cli import main

    write_gguf(tmp_path / "tiny.Q8_0.gguf", tiny_models["qwen3"], "qwen3", Q.Q8_0, PAIR / "target")
    run = lambda *a: (main(["models", "import", *a]), capsys.readouterr())  # noqa: E731
    code, out = run(str(tmp_path / "tiny.Q8_0.gguf"), str(tmp_path / "out"))
    assert code == 0 and out.out == f"imported tiny.Q8_0.gguf -> {tmp_path / 'out'}\n"
    assert load_model(tmp_path / "out").config.qk_norm
    code, out = run(str(tmp_path / "tiny.Q8_0.gguf"), str(tmp_path / "out"))
    assert code == 2 and "exists and is not an empty directory" in out.err
    assert run(str(tmp_path / "tiny.Q8_0.gguf"), str(tmp_path / "out"), "--if-missing")[0] == 0
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf at all")
    code, out = run(str(tmp_path / "bad.gguf"), str(tmp_path / "bad-out"))
    assert code == 2
    assert out.err.strip().splitlines() == [f"specrelay models: error: {tmp_path / 'bad.gguf'}: not a readable "
                                            "GGUF file (GGUF magic invalid)"]
    assert run()[0] == 2  # neither a file nor --default


def test_generation_config_keeps_the_stop_tokens_and_recommended_sampling(tiny_models, tmp_path):
    import json

    from specrelay.models.gguf_config import generation_config

    write_gguf(tmp_path / "t.gguf", tiny_models["llama"], "llama", Q.F32, PAIR / "target")
    out = import_gguf(tmp_path / "t.gguf", tmp_path / "out")
    assert json.loads((out / "generation_config.json").read_text()) == {"do_sample": False, "eos_token_id": 2,
                                                                          "pad_token_id": 0}
    recommended = {"tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.eot_token_id": 7,
                   "general.sampling.temp": float(np.float32(0.2)), "general.sampling.top_k": 40}
    assert generation_config(recommended) == {"do_sample": True, "eos_token_id": [2, 7], "temperature": 0.2,
                                              "top_k": 40}


def test_a_sentencepiece_vocabulary_tokenizes_as_llama_cpp_does():
    """Merges rebuilt from the scores, a space prefix (after special tokens too, as llama.cpp's SPM tokenizer
    writes it), unknown characters as bytes."""
    from specrelay.models.gguf_tokenizer import build_tokenizer

    chars, pieces = list("▁helowrd"), ["▁h", "▁he", "▁hel", "▁hell", "▁hello", "▁w", "▁wo", "▁wor", "▁worl",
                                        "▁world", "lo"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *chars, *pieces]
    metadata = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.unknown_token_id": 0,
                "tokenizer.ggml.token_type": [2, 3, 3, *[6] * 256, *[1] * (len(chars) + len(pieces))],
                "tokenizer.ggml.scores": [0.0] * 259 + [-100.0 - i for i in range(len(chars))]
                + [-1.0 - i for i in range(len(pieces))]}
    tokenizer = build_tokenizer(metadata, Path("spm.gguf"))
    for text, expected in [("hello world", ["▁hello", "▁world"]), ("héllo", ["▁h", "<0xC3>", "<0xA9>", "l", "lo"]),
                           ("hello</s>world", ["▁hello", "</s>", "▁world"])]:
        encoding = tokenizer.encode(text)
        assert encoding.tokens == expected
        assert tokenizer.decode(encoding.ids) == text.replace("</s>", " ")  # the prefix space shows after </s>
    with pytest.raises(ModelLoadError, match=r"spm\.gguf: tokenizer model 'bert' is not supported"):
        build_tokenizer({**metadata, "tokenizer.ggml.model": "bert"}, Path("spm.gguf"))
