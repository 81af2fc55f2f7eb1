"""Two processes on CPU (gloo): statistics over shards equal one process's over the union; SC-LoRA adapters
are bit-identical on both ranks and equal one process's; DDP training with a global batch of 4 (2 ranks x 2)
ends where one process (2 micro-batches of 2, accumulated) does. One spawn of two workers does all of it
(starting processes costs more than the work); the tests check what the workers wrote."""

import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import random_batches, tiny_llama, tiny_tokenizer
from safetensors.torch import load_file

import sclora
from sclora import CovarianceStats, SCLoRAConfig, collect_covariances, export_lora, get_sclora_model
from sclora import distributed as sd
from sclora.methods.residual import ADAPTER, adapter_layers
from sclora.methods.salora import safety_directions
from sclora.train import TrainConfig, train

WORLD = 2
#: (normalize, side): raw sums, per-sample scaling inside the hook, read-time trace on input-side sums
SETTINGS = [("none", "output"), ("max_abs", "output"), ("trace", "input")]
CONFIG = SCLoRAConfig(r=4, beta=0.6)
SALORA = SCLoRAConfig(method="salora", r=4, salora_safety_rank=3, salora_task_rank=5)
TRAIN = TrainConfig(learning_rate=1e-2, batch_size=4, micro_batch_size=2, warmup_ratio=0.0, max_length=64,
                    max_steps=3, save_steps=100)
# Different lengths, so that micro-batches hold different token counts: the loss must be normalized by the
# global token count of the step, across ranks, to match one process.
EXAMPLES = [
    {"prompt": "what is one plus two ?", "response": "one plus two equals three ."},
    {"prompt": "what is the capital of france ?", "response": "paris ."},
    {"prompt": "what is two plus two ?", "response": "two plus two equals four , the answer is four ."},
    {"prompt": "how make bread ?", "response": "sorry , cannot help ."},
    {"prompt": "what is three plus five ?", "response": "eight ."},
    {"prompt": "which city is the capital of rome ?", "response": "rome is a city ."},
    {"prompt": "what is six minus two ?", "response": "six minus two equals four ."},
    {"prompt": "summary of the paper ?", "response": "we propose a method , results show it is one of the best ."},
    {"prompt": "what is nine minus one ?", "response": "eight ."},
    {"prompt": "who is in berlin ?", "response": "sure , here is the answer : one city ."},
    {"prompt": "what is ten minus seven ?", "response": "three ."},
    {"prompt": "think step by step : two plus one ?", "response": "two plus one equals three ."},
]
DTYPE = torch.float64  # float64 everywhere: differences left are reduction order, far below the tolerances


def plus_batches():  # 5 batches: the shards (3 and 2 batches) differ in size
    return random_batches(n_batches=5, batch_size=3, seq_len=10, seed=21)


def minus_batches():
    return random_batches(n_batches=3, batch_size=4, seq_len=10, seed=22)


def adapter_state(peft_model) -> dict[str, torch.Tensor]:
    state = {}
    for name, layer in adapter_layers(peft_model).items():
        state[f"{name}.A"] = layer.lora_A[ADAPTER].weight.detach().clone()
        state[f"{name}.B"] = layer.lora_B[ADAPTER].weight.detach().clone()
        state[f"{name}.W_res"] = layer.get_base_layer().weight.detach().clone()
    return state


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def stats_record(stats: CovarianceStats) -> dict:
    return {"sums": {k: v.clone() for k, v in stats.sums.items()}, "n_samples": stats.n_samples,
            "n_tokens": stats.n_tokens, "covs": {name: stats[name].clone() for name in stats}}


# --------------------------------------------------------------------------- the two workers


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    out: dict = {}
    try:
        # (a) statistics: each rank collects over its strided shard; the sums and counts are all-reduced.
        model = tiny_llama(seed=3, dtype=DTYPE)
        for normalize, side in SETTINGS:
            stats = collect_covariances(model, sd.shard(plus_batches()), normalize=normalize, side=side,
                                        dtype=torch.float64, show_progress=False)
            out[f"stats/{normalize}-{side}"] = stats_record(stats)
        out["local_batches"] = len(sd.shard(plus_batches()))
        # A rank without data fails on every rank instead of leaving the other one waiting in the all-reduce.
        try:
            collect_covariances(model, [] if rank == 1 else plus_batches(), show_progress=False)
        except (ValueError, RuntimeError) as err:
            out["empty_shard_error"] = f"{type(err).__name__}: {err}"

        # (b) SC-LoRA: each rank decomposes half of the modules, then the factors are broadcast.
        plus = CovarianceStats.load(os.path.join(tmp, "plus.safetensors"))
        minus = CovarianceStats.load(os.path.join(tmp, "minus.safetensors"))
        salora = sclora.init_model(tiny_llama(seed=3, dtype=DTYPE), SALORA, plus=plus, minus=minus, show_progress=False)
        out["salora"] = {**adapter_state(salora), **{f"{n}.U_s": u.clone() for n, u in safety_directions(salora).items()}}
        peft_model = get_sclora_model(tiny_llama(seed=3, dtype=DTYPE), CONFIG, plus, minus, show_progress=False)
        out["adapter"] = adapter_state(peft_model)

        # (c) DDP training (Trainer under an initialized gloo group); export on rank 0 only.
        try:
            train(peft_model, tiny_tokenizer(), EXAMPLES, TrainConfig(**{**TRAIN.to_dict(), "micro_batch_size": 4}),
                  os.path.join(tmp, "bad"), show_progress=False)
        except ValueError as err:
            out["batch_error"] = str(err)
        result = train(peft_model, tiny_tokenizer(), EXAMPLES, TRAIN, os.path.join(tmp, "ddp"), show_progress=False)
        out["trained"] = trainable_state(peft_model)
        out["losses"] = result.loss_history
        out["steps"] = result.steps
        if sd.is_main_process():
            export_lora(peft_model, os.path.join(tmp, "ddp_adapter"))
        sd.barrier()
        out["export_seen"] = os.path.exists(os.path.join(tmp, "ddp_adapter", "adapter_model.safetensors"))

        # FSDP (torch's own, on CPU; accelerate's FSDP needs GPUs): each rank holds a shard of every decoder
        # layer; full_parameters gathers them on rank 0 for the export, which must equal the DDP one.
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        root = FSDP(peft_model, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}), use_orig_params=True,
                    device_id=torch.device("cpu"))
        root(input_ids=plus_batches()[0]["input_ids"])
        out["fsdp_shard_numel"] = adapter_layers(peft_model)["model.layers.0.self_attn.q_proj"].lora_A[
            ADAPTER].weight.numel()
        with sd.full_parameters(root):
            if sd.is_main_process():
                export_lora(peft_model, os.path.join(tmp, "fsdp_adapter"))
        sd.barrier()
    finally:
        torch.save(out, os.path.join(tmp, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(tmp: str, timeout: float = 240.0) -> None:
    context = mp.start_processes(_worker, args=(WORLD, _free_port(), tmp), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):  # re-raises a worker's exception with its traceback
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} workers did not finish within {timeout} s (a collective hung?)")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distributed")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise comparisons with the workers, which run one thread each
    try:
        model = tiny_llama(seed=3, dtype=DTYPE)
        plus = collect_covariances(model, plus_batches(), dtype=torch.float64, show_progress=False)
        plus.save(tmp / "plus.safetensors")
        collect_covariances(model, minus_batches(), dtype=torch.float64, show_progress=False).save(
            tmp / "minus.safetensors")
        _spawn(str(tmp))

        ref: dict = {}
        for normalize, side in SETTINGS:
            stats = collect_covariances(model, plus_batches(), normalize=normalize, side=side, dtype=torch.float64,
                                        show_progress=False)
            ref[f"stats/{normalize}-{side}"] = stats_record(stats)
        peft_model = get_sclora_model(tiny_llama(seed=3, dtype=DTYPE), CONFIG,
                                      CovarianceStats.load(tmp / "plus.safetensors"),
                                      CovarianceStats.load(tmp / "minus.safetensors"), show_progress=False)
        ref["adapter"] = adapter_state(peft_model)
        salora = sclora.init_model(tiny_llama(seed=3, dtype=DTYPE), SALORA, plus=CovarianceStats.load(tmp / "plus.safetensors"),
                                   minus=CovarianceStats.load(tmp / "minus.safetensors"), show_progress=False)
        ref["salora"] = {**adapter_state(salora), **{f"{n}.U_s": u.clone() for n, u in safety_directions(salora).items()}}
        ref["initial"] = trainable_state(peft_model)
        result = train(peft_model, tiny_tokenizer(), EXAMPLES, TRAIN, tmp / "single", show_progress=False)
        ref["trained"] = trainable_state(peft_model)
        ref["losses"] = result.loss_history
        export_lora(peft_model, tmp / "single_adapter")
    finally:
        torch.set_num_threads(threads)
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return ref, ranks, tmp


# --------------------------------------------------------------------------- tests


def test_shard_is_a_strided_partition():
    items = list(range(7))
    shards = [sd.shard(items, r, 3) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert sd.shard(items) == items  # a single process keeps everything
    assert sd.all_reduce_sums({"x": torch.ones(2)}, 3, 4) == (3, 4)
    with pytest.raises(ValueError, match="rank"):
        sd.shard(items, 3, 3)


@pytest.mark.parametrize("setting", [f"{n}-{s}" for n, s in SETTINGS])
def test_sharded_statistics_equal_single_process(runs, setting):
    ref, ranks, _ = runs
    expected = ref[f"stats/{setting}"]
    assert [r["local_batches"] for r in ranks] == [3, 2]  # each rank really saw only its part
    for rank in ranks:
        got = rank[f"stats/{setting}"]
        assert (got["n_samples"], got["n_tokens"]) == (expected["n_samples"], expected["n_tokens"])
        assert got["sums"].keys() == expected["sums"].keys()
        for key, value in expected["sums"].items():
            torch.testing.assert_close(got["sums"][key], value, rtol=1e-12, atol=1e-12)
        for name, cov in expected["covs"].items():  # normalized and read back through the weights
            torch.testing.assert_close(got["covs"][name], cov, rtol=1e-10, atol=1e-12)


def test_a_rank_without_data_fails_on_every_rank(runs):
    _, ranks, _ = runs
    assert ranks[1]["empty_shard_error"].startswith("ValueError: Rank 1 got no batches")
    assert ranks[0]["empty_shard_error"].startswith("RuntimeError:")


def test_sclora_adapters_identical_across_ranks_and_equal_single_process(runs):
    ref, ranks, _ = runs
    expected = ref["adapter"]
    assert len(expected) == 3 * 14  # 2 layers x 7 modules, each A, B and W_res
    for got in ranks:
        assert got["adapter"].keys() == expected.keys()
        for key, value in expected.items():
            # bit-identical: the owner computes what one process computes, the others receive its bits
            assert torch.equal(got["adapter"][key], value), key


def test_salora_adapters_and_safety_modules_identical_across_ranks_and_equal_single_process(runs):
    """Every rank finds every layer's safety directions itself (it needs C for its own copy of the layer) and receives
    the factors of the layers another rank decomposed: all bit-identical to one process."""
    ref, ranks, _ = runs
    expected = ref["salora"]
    assert len(expected) == 4 * 14  # A, effective B, W_res and U_s of 2 layers x 7 modules
    for got in ranks:
        assert got["salora"].keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(got["salora"][key], value), key


def test_ddp_training_matches_single_process_with_same_global_batch(runs):
    ref, ranks, tmp = runs
    moved = max((ref["trained"][k] - ref["initial"][k]).abs().max().item() for k in ref["initial"])
    assert moved > 1e-3  # the adapters trained, so agreeing below means something
    for got in ranks:
        assert got["steps"] == TRAIN.max_steps
        assert got["trained"].keys() == ref["trained"].keys()
        for key, value in ref["trained"].items():
            torch.testing.assert_close(got["trained"][key], value, rtol=1e-7, atol=1e-9)
        assert [s for s, _ in got["losses"]] == [s for s, _ in ref["losses"]]
        torch.testing.assert_close(torch.tensor([v for _, v in got["losses"]]),
                                   torch.tensor([v for _, v in ref["losses"]]), rtol=1e-5, atol=1e-6)
    for key in ref["trained"]:  # DDP keeps the replicas identical
        assert torch.equal(ranks[0]["trained"][key], ranks[1]["trained"][key]), key
    assert "micro_batch_size x processes (4 x 2 = 8)" in ranks[0]["batch_error"]
    # rank 0 exported after training; rank 1 saw the file after the barrier; it matches one process's export
    assert all(r["export_seen"] for r in ranks)
    ddp, single = load_file(tmp / "ddp_adapter" / "adapter_model.safetensors"), load_file(
        tmp / "single_adapter" / "adapter_model.safetensors")
    assert ddp.keys() == single.keys()
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-5, atol=1e-6)  # exported as float32
    for name in ("train_log.json", "train_run.json"):
        assert (tmp / "ddp" / name).exists()


def test_export_after_fsdp_gathers_the_whole_adapter_on_rank_0(runs):
    _, ranks, tmp = runs
    r = CONFIG.r
    assert sorted(rank["fsdp_shard_numel"] for rank in ranks) == [0, r * 32]  # really sharded (32 = hidden size)
    fsdp, ddp = (load_file(tmp / name / "adapter_model.safetensors") for name in ("fsdp_adapter", "ddp_adapter"))
    assert fsdp.keys() == ddp.keys()
    for key in ddp:
        assert torch.equal(fsdp[key], ddp[key]), key
