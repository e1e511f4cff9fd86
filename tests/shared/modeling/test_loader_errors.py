"""A broken model directory gives one message that names the file and the problem."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from specrelay.shared.errors import ModelLoadError
from specrelay.shared.modeling.loader import load_model


@pytest.fixture
def model_dir(hf_model_dirs, tmp_path):
    src, _ = hf_model_dirs["llama"]
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def edit_config(model_dir, **changes):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.update(changes)
    (model_dir / "config.json").write_text(json.dumps(cfg))


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="not a directory"):
        load_model(tmp_path / "nope")


def test_missing_config(model_dir):
    (model_dir / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"config\.json: not found"):
        load_model(model_dir)


def test_config_that_is_not_json(model_dir):
    (model_dir / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config\.json: not valid JSON"):
        load_model(model_dir)


def test_unsupported_architecture(model_dir):
    edit_config(model_dir, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(ModelLoadError, match=r"config\.json: model_type 'gpt2' is not supported"):
        load_model(model_dir)


def test_unsupported_rope_scaling(model_dir):
    edit_config(model_dir, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
    with pytest.raises(ModelLoadError, match="rope scaling type 'yarn' is not supported"):
        load_model(model_dir)


def test_missing_weights_file(model_dir):
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors weights found"):
        load_model(model_dir)


def test_corrupt_weights_file(model_dir):
    (model_dir / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage")
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: cannot read safetensors"):
        load_model(model_dir)


def test_missing_tensor(model_dir):
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, model_dir / "model.safetensors")
    with pytest.raises(ModelLoadError, match="weights missing from the safetensors files: model.norm.weight"):
        load_model(model_dir)


def test_shape_that_contradicts_the_config(model_dir):
    edit_config(model_dir, intermediate_size=128)
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' "
                                             r"has shape"):
        load_model(model_dir)


def test_sharded_checkpoint_loads_like_a_single_file(model_dir, tmp_path):
    tensors = load_file(model_dir / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(model_dir / "config.json", sharded / "config.json")
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, sharded / file)
    index = {"weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    a, b = load_model(model_dir), load_model(sharded)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name


def test_bf16_loads_as_asked(model_dir):
    model = load_model(model_dir, dtype="bf16")
    assert model.dtype == torch.bfloat16
    assert model.inv_freq.dtype == torch.float32
