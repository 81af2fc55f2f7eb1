"""The method registry is what the code does: each record's builder, needed data, residual and normalization are
checked against the init itself, and every surface (config, CLI, YAML runs, docs table) lists the same methods."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import random_batches, tiny_llama

import sclora
import sclora.methods
from sclora import SCLoRAConfig, cli, init_model
from sclora.registry import METHOD_SPECS, METHODS, method_spec, methods_table

SIGNATURE = ["model", "config", "plus", "minus", "show_progress"]
#: SaLoRA's default ranks (32) would remove every direction of the tiny model's 32-wide layers
SMALL = {"salora_safety_rank": 4, "salora_task_rank": 4}


@pytest.mark.parametrize("name", METHODS)
def test_each_builder_exists_with_the_common_signature(name):
    build = getattr(sclora.methods, method_spec(name).builder)
    assert list(inspect.signature(build).parameters) == SIGNATURE


@pytest.mark.parametrize("name", METHODS)
def test_each_record_says_what_its_init_does(name):
    spec = method_spec(name)
    assert SCLoRAConfig(method=name).resolved_normalize == spec.normalize
    model = tiny_llama(seed=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for label in spec.needs:  # each needed set, left out, is named in the error
        data = {k: random_batches(seed=i + 1) for i, k in enumerate(spec.needs) if k != label}
        with pytest.raises(ValueError, match=f"needs {label} data"):
            init_model(tiny_llama(seed=3), method=name, r=2, show_progress=False, **data)
    data = {k: random_batches(seed=i + 1) for i, k in enumerate(spec.needs)}
    if name == "guardspace":  # fewer D- tokens than the layers' widths, so its null space is not empty
        data["minus"] = random_batches(n_batches=1, batch_size=2, seq_len=8, seed=2)
    torch.manual_seed(0)
    out = init_model(model, method=name, r=2, show_progress=False, **data, **(SMALL if name == "salora" else {}))
    assert hasattr(out, "peft_config") is spec.adapter
    if not spec.adapter:
        return
    base = dict(out.base_model.model.named_parameters())
    changed = [n for n, p in before.items() if not torch.equal(base[n.replace(".weight", ".base_layer.weight")
                                                                     if n.replace(".weight", ".base_layer.weight")
                                                                     in base else n], p)]
    assert bool(changed) is spec.residual, changed[:3]  # W_res = W0 - s B0 A0 written into the base weight


def test_several_sets_only_where_the_record_allows_them():
    two = [random_batches(seed=2), random_batches(seed=3)]
    for name, spec in METHOD_SPECS.items():
        if "minus" not in spec.needs:
            continue
        kwargs = {"plus": random_batches(seed=1)} if "plus" in spec.needs else {}
        if spec.several_sets:
            init_model(tiny_llama(), method=name, r=2, beta=[0.4, 0.4], minus=two, show_progress=False, **kwargs)
        else:
            with pytest.raises(ValueError, match="preserves one knowledge set but 2 were given"):
                init_model(tiny_llama(), method=name, r=2, minus=two, show_progress=False, **kwargs)


def test_every_surface_lists_the_registry_methods(capsys):
    assert sclora.METHODS == METHODS == tuple(METHOD_SPECS)
    with pytest.raises(ValueError, match=r"method must be one of \(" + ", ".join(f"'{m}'" for m in METHODS)):
        SCLoRAConfig(method="dora")
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["init", "--help"])
    assert ", ".join(METHODS) in " ".join(capsys.readouterr().out.split())
    table = methods_table().splitlines()
    assert len(table) == 2 + len(METHODS) and all(f"`{m}`" in "\n".join(table) for m in METHODS)


def test_yaml_runs_take_every_init_field_but_the_experiments_own():
    from dataclasses import fields

    from sclora.experiments.spec import RUN_KEYS

    assert {f.name for f in fields(SCLoRAConfig)} - RUN_KEYS == {"target_modules", "dtype"}
    assert {"eigen_solver", "quantize_residual", "use_rslora", "learning_rate", "num_epochs"} <= RUN_KEYS


def test_the_readme_methods_table_is_the_registrys():
    from pathlib import Path

    text = (Path(__file__).parents[1] / "README.md").read_text()
    block = text.split("<!-- methods-table -->\n", 1)[1].split("\n<!-- /methods-table -->", 1)[0]
    assert block.strip() == methods_table().strip()
