"""Parity with PEFT itself on a tiny model: the baselines are the methods as PEFT (and their authors) define them.
CorDA IPA / KPA from the same samples (sclora: batched and padded; PEFT: batch size 1, its only mode) must give the
same adapter subspaces; PiSSA the same adapter, exactly. These guard any future change of the statistics."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import VOCAB, tiny_llama

from sclora import init_model

TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
R = 4


def samples(seed: int = 7, n: int = 9) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (1, int(torch.randint(5, 24, (1,), generator=g))), generator=g) for _ in range(n)]


def padded_batches(rows: list[torch.Tensor], batch_size: int = 4, left: bool = False) -> list[dict]:
    batches = []
    for i in range(0, len(rows), batch_size):
        part = rows[i:i + batch_size]
        width = max(r.shape[1] for r in part)
        ids = torch.zeros(len(part), width, dtype=torch.long)
        mask = torch.zeros(len(part), width, dtype=torch.long)
        for j, r in enumerate(part):
            span = slice(width - r.shape[1], width) if left else slice(0, r.shape[1])
            ids[j, span], mask[j, span] = r[0], 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def lora_b(peft_model) -> dict[str, torch.Tensor]:
    return {name.removeprefix("base_model.model.").removesuffix(".lora_B.default.weight"): p.detach().double()
            for name, p in peft_model.named_parameters() if name.endswith("lora_B.default.weight")}


def projector_distance(b1: torch.Tensor, b2: torch.Tensor) -> float:
    """Spectral norm of the difference of the orthogonal projectors onto the column spaces (0: same space)."""
    q1, q2 = torch.linalg.qr(b1)[0], torch.linalg.qr(b2)[0]
    return torch.linalg.matrix_norm(q1 @ q1.T - q2 @ q2.T, ord=2).item()


def peft_corda(model, rows, mode: str):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    config = LoraConfig(r=R, lora_alpha=R, target_modules=TARGETS, init_lora_weights="corda",
                        corda_config=CordaConfig(corda_method={"ipa": "ipm", "kpa": "kpm"}[mode]))

    @torch.no_grad()
    def run_model():
        for ids in rows:
            model(ids)

    preprocess_corda(model, config, run_model=run_model)
    return get_peft_model(model, config)


@pytest.mark.parametrize("mode", ["ipa", "kpa"])
@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_corda_is_peft_corda_from_the_same_samples(mode, left):
    rows = samples()
    base = tiny_llama(seed=5)
    theirs = lora_b(peft_corda(copy.deepcopy(base), rows, mode))
    ours = lora_b(init_model(copy.deepcopy(base), method=f"corda_{mode}", r=R, lora_alpha=R, target_modules=TARGETS,
                             **{"plus" if mode == "ipa" else "minus": padded_batches(rows, left=left)},
                             show_progress=False))
    assert set(ours) == set(theirs) and len(ours) == 2 * len(TARGETS)
    distances = torch.tensor([projector_distance(ours[n], theirs[n]) for n in ours])
    assert distances.median() <= 1e-4, distances
    assert distances.max() <= 1e-3, distances


def test_without_the_authors_scaling_corda_is_not_peft_corda():
    """The guard can fail: unscaled statistics (sclora's CorDA before) give other subspaces."""
    rows = samples()
    base = tiny_llama(seed=5)
    theirs = lora_b(peft_corda(copy.deepcopy(base), rows, "kpa"))
    ours = lora_b(init_model(copy.deepcopy(base), method="corda_kpa", r=R, lora_alpha=R, target_modules=TARGETS,
                             normalize="none", minus=padded_batches(rows), show_progress=False))
    distances = torch.tensor([projector_distance(ours[n], theirs[n]) for n in ours])
    assert distances.median() > 1e-2, distances


def test_pissa_is_peft_pissa_exactly():
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(seed=6)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=R, lora_alpha=2 * R, target_modules=TARGETS,
                                                           init_lora_weights="pissa"))
    ours = init_model(copy.deepcopy(base), method="pissa", r=R, lora_alpha=2 * R, target_modules=TARGETS)
    mine, peft_params = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert set(mine) == set(peft_params)
    for name, p in peft_params.items():
        assert torch.equal(mine[name], p), name


def test_olora_is_peft_olora_exactly_and_keeps_the_function():
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(seed=6)
    ids = torch.tensor([[3, 9, 27, 40, 11]])
    with torch.no_grad():
        before = base(ids).logits
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=R, lora_alpha=R, target_modules=TARGETS,
                                                           init_lora_weights="olora"))
    ours = init_model(copy.deepcopy(base), method="olora", r=R, lora_alpha=R, target_modules=TARGETS)
    mine, peft_params = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert set(mine) == set(peft_params) and all(torch.equal(mine[n], p) for n, p in peft_params.items())
    with torch.no_grad():
        assert (ours(ids).logits - before).abs().max() < 1e-4


def test_eva_is_peft_eva_from_the_same_batches():
    from peft import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights

    base = tiny_llama(seed=6)
    batches = padded_batches(samples(n=16), batch_size=4)
    config = LoraConfig(r=R, lora_alpha=R, target_modules=TARGETS, init_lora_weights="eva", eva_config=EvaConfig())
    theirs = get_peft_model(copy.deepcopy(base), config, low_cpu_mem_usage=True)
    with torch.no_grad():
        initialize_lora_eva_weights(theirs, dataloader=batches, show_progress_bar=False)
    ours = init_model(copy.deepcopy(base), method="eva", r=R, lora_alpha=R, target_modules=TARGETS, plus=batches,
                      show_progress=False)
    mine, peft_params = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert set(mine) == set(peft_params)
    for name, p in peft_params.items():
        torch.testing.assert_close(mine[name], p, atol=1e-6, rtol=1e-5)
    a = [p for n, p in mine.items() if "lora_A" in n]
    assert a and any(p.abs().sum() > 0 for p in a)  # A holds the inputs' singular vectors
    assert all(p.abs().sum() == 0 for n, p in mine.items() if "lora_B" in n)  # B = 0: the function is the base's


def test_mica_is_peft_mica_the_minor_left_singular_vectors_with_b_frozen_and_exports(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    from sclora import export_lora
    from sclora.train import TrainConfig, train
    from conftest import tiny_tokenizer

    base = tiny_llama(seed=6)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=R, lora_alpha=R, target_modules=TARGETS,
                                                           init_lora_weights="mica"))
    ours = init_model(copy.deepcopy(base), method="mica", r=R, lora_alpha=R, target_modules=TARGETS)
    mine, peft_params = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert set(mine) == set(peft_params) and all(torch.equal(mine[n], p) for n, p in peft_params.items())
    weights = dict(base.named_modules())
    for name, p in mine.items():  # the definition, in float64: B spans the r smallest singular directions, A = 0
        if ".lora_B." in name:
            assert not p.requires_grad
            w = weights[name.split("base_model.model.", 1)[1].rsplit(".lora_B.", 1)[0]].weight.double()
            u, _, _ = torch.linalg.svd(w, full_matrices=False)
            assert projector_distance(p.double(), u[:, -R:]) < 1e-5, name
        if ".lora_A." in name:
            assert p.requires_grad and not p.any()
    rows = [{"prompt": "what is the capital of france", "response": "paris"}] * 4
    train(ours, tiny_tokenizer(), rows, TrainConfig(learning_rate=5e-2, batch_size=4, max_steps=2, max_length=16),
          tmp_path / "ckpt", show_progress=False)
    export_lora(ours, tmp_path / "adapter")
    ids = torch.tensor([[3, 9, 27, 40, 11]])
    with torch.no_grad():
        trained = ours(ids).logits
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")(ids).logits
        assert (trained - base(ids).logits).abs().max() > 1e-4  # A trained
    assert (loaded - trained).abs().max() < 1e-5
