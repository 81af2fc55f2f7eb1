"""Tiny random Llama models built from a config: no download, seconds to run."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 96


def tiny_llama(seed: int = 0, dtype=torch.float32, **overrides) -> LlamaForCausalLM:
    # intermediate > hidden so gate/up (d_out > d_in) take the input-side path.
    cfg = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).to(dtype)
    # A larger init than the default 0.02 so activations are not all near zero.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    return model.eval()


def random_batches(n_batches=3, batch_size=4, seq_len=12, seed=1, pad_left=False):
    """Batches of random tokens with random padding (at least 2 real tokens per sample)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1, VOCAB, (batch_size, seq_len), generator=g)
        lengths = torch.randint(2, seq_len + 1, (batch_size,), generator=g)
        pos = torch.arange(seq_len)[None]
        mask = (pos >= seq_len - lengths[:, None]) if pad_left else (pos < lengths[:, None])
        out.append({"input_ids": ids.masked_fill(~mask, 0), "attention_mask": mask.long()})
    return out


@pytest.fixture
def model():
    return tiny_llama()


WORDS = ("the a an of to is in what who which capital city france paris rome berlin answer question "
         "one two three four five six seven eight nine ten plus minus equals sorry cannot help sure here "
         "how make bread summary paper we propose method results show think step by").split()


def tiny_tokenizer():
    """A word-level tokenizer whose ids fit the tiny models' vocabulary, with a simple chat template."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    punct = list(".,?!:\n#")
    vocab = {tok: i for i, tok in enumerate(specials + punct + list(WORDS))}
    assert len(vocab) <= VOCAB
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant :{% endif %}")
    return tok


# --- a whole tiny experiment (tests of `sclora run`) ------------------------------------------------------------

_TRIVIA_WORDS = "paris rome berlin one two three four five six seven eight nine ten".split()
#: trivia items in the tiny tokenizer's vocabulary (monkeypatched over sclora.experiments.data.trivia)
TRIVIA = [{"question": f"what is {a} {b}", "answers": [b], "topic": "t"} for a in _TRIVIA_WORDS
          for b in _TRIVIA_WORDS[:3]]


def save_tiny_model(path):
    """A tiny random Llama and the tiny tokenizer saved as a model folder at ``path``; returns it."""
    tiny_llama(seed=2).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def tiny_experiment(model_dir, **changes) -> dict:
    """An experiment config on the tiny model and TRIVIA (seconds per run); ``changes`` replace top-level keys."""
    config = {
        "name": "tiny", "model": str(model_dir), "r": 2, "stats_seq_len": 16, "stats_batch_size": 4,
        "plus": {"kind": "trivia", "n": 8}, "minus": {"kind": "trivia", "n": 8, "offset": 8},
        "train_data": {"kind": "trivia", "n": 8, "offset": 16},
        "train": {"learning_rate": 1e-2, "batch_size": 4, "micro_batch_size": 2, "max_length": 32, "save_steps": 1},
        "evaluate": {"knowledge_logprob": {"kind": "trivia", "n": 6, "offset": 24}},
        "runs": [{"method": "lora"}, {"method": "sc_lora", "beta": 0.5}, {"method": "corda_kpa"}],
    }
    config.update(changes)
    return config
