"""SCLoRAConfig: every invalid field value is a ValueError naming the field; valid ones stay valid."""

import math
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sclora import SCLoRAConfig
from sclora.config import DTYPES, EIGEN_SOLVERS, LLAMA_TARGET_MODULES, METHODS
from sclora.statistics import NORMALIZATIONS

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("field,value,allowed", [
    ("lora_alpha", NAN, "finite number > 0"), ("lora_alpha", INF, "finite number > 0"),
    ("lora_alpha", True, "finite number > 0"), ("lora_alpha", "16", "finite number > 0"),
    ("r", True, "positive integer"), ("beta", True, r"number in \[0, 1\]"),
    ("beta", [0.2, True], r"beta\[1\] must be a number >= 0"), ("beta", [0.1, INF], r"beta\[1\] must be a number >= 0"),
    ("lora_dropout", -1, r"in \[0, 1\)"), ("lora_dropout", 1, r"in \[0, 1\)"), ("lora_dropout", NAN, r"in \[0, 1\)"),
    ("lora_dropout", False, r"in \[0, 1\)"),
    ("use_rslora", "yes", "True or False"), ("use_rslora", 1, "True or False"),
    ("target_modules", ["q_proj", 3], "list of module name suffixes"), ("target_modules", [], "non-empty list"),
    ("target_modules", 3, "regex string"), ("target_modules", "q_proj(", "not a valid regex"),
    ("dtype", ["float32"], "dtype must be one of"),
])
def test_invalid_values_name_the_field_the_value_and_the_allowed_range(field, value, allowed):
    with pytest.raises(ValueError, match=allowed) as err:
        SCLoRAConfig(**{field: value})
    message = str(err.value)
    assert field in message
    assert repr(value) in message or repr(value[-1]) in message  # a list's bad entry is the last one here


def test_valid_values_are_kept():
    assert SCLoRAConfig(r=4).lora_alpha is None and SCLoRAConfig(r=4).resolved_alpha == 4  # None: lora_alpha = r
    config = SCLoRAConfig(r=4, lora_alpha=8.5, beta=1, lora_dropout=0.1, use_rslora=True, target_modules=r".*_proj")
    assert (config.lora_alpha, config.beta, config.lora_dropout, config.scaling) == (8.5, 1, 0.1, 8.5 / 2)
    assert SCLoRAConfig(beta=(0.25, 0.5), target_modules=("q_proj",)).beta == [0.25, 0.5]


def test_a_failed_save_keeps_the_old_config_and_leaves_no_temp_file(tmp_path, monkeypatch):
    SCLoRAConfig(r=4).save_pretrained(tmp_path)
    good = (tmp_path / "sclora_config.json").read_bytes()

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        SCLoRAConfig(r=8).save_pretrained(tmp_path)
    assert os.listdir(tmp_path) == ["sclora_config.json"] and (tmp_path / "sclora_config.json").read_bytes() == good
    monkeypatch.undo()
    assert SCLoRAConfig.from_pretrained(tmp_path).r == 4


# --- property: any value is either a valid config or a ValueError that names its field -----------

JUNK = st.one_of(
    st.booleans(), st.none(), st.sampled_from([NAN, INF, -INF, 0, -1, 1, 0.0, 1.0, 1e300]), st.integers(-10, 100),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
    st.lists(st.one_of(st.floats(allow_nan=True), st.booleans(), st.integers(-2, 2), st.text(max_size=3)), max_size=3),
    st.tuples(st.floats(0, 1)), st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)
VALID = {
    "method": st.sampled_from(METHODS),
    "r": st.integers(1, 64),
    "lora_alpha": st.none() | st.integers(1, 64) | st.floats(0.01, 100),
    "lora_dropout": st.floats(0, 0.99),
    "use_rslora": st.booleans(),
    "beta": st.floats(0, 1) | st.lists(st.floats(0, 0.3), min_size=1, max_size=3),
    "target_modules": st.sampled_from([None, "q_proj", r".*\.v_proj"]) | st.lists(st.sampled_from(LLAMA_TARGET_MODULES),
                                                                             min_size=1),
    "normalize": st.sampled_from(NORMALIZATIONS),
    "dtype": st.sampled_from(list(DTYPES)),
    "eigen_solver": st.sampled_from(EIGEN_SOLVERS),
}


def real(x) -> bool:
    return type(x) in (int, float) and math.isfinite(x)


def assert_valid(config: SCLoRAConfig) -> None:
    assert config.method in METHODS and config.resolved_normalize in NORMALIZATIONS and config.dtype in DTYPES
    assert config.eigen_solver in EIGEN_SOLVERS
    assert type(config.r) is int and config.r >= 1
    assert real(config.resolved_alpha) and config.resolved_alpha > 0 and math.isfinite(config.scaling)
    assert real(config.lora_dropout) and 0 <= config.lora_dropout < 1
    assert type(config.use_rslora) is bool
    betas = config.beta if isinstance(config.beta, list) else [config.beta]
    assert betas and all(real(b) and 0 <= b <= 1 for b in betas) and sum(betas) <= 1 + 1e-12
    targets = config.target_modules
    assert targets is None or isinstance(targets, str) or (targets and all(isinstance(t, str) for t in targets))
    assert SCLoRAConfig.from_dict(config.to_dict()) == config


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_field_value_gives_a_valid_config_or_a_value_error_naming_the_field(data):
    field = data.draw(st.sampled_from(sorted(VALID)), label="field")
    value = data.draw(VALID[field] | JUNK, label="value")
    try:
        config = SCLoRAConfig(**{field: value})
    except ValueError as err:
        assert field in str(err)
    else:
        assert_valid(config)


@settings(max_examples=200, deadline=None)
@given(values=st.fixed_dictionaries({}, optional={name: s | JUNK for name, s in VALID.items()}))
def test_several_fields_at_once_give_a_valid_config_or_a_value_error_naming_one(values):
    try:
        config = SCLoRAConfig(**values)
    except ValueError as err:
        assert any(name in str(err) for name in values)
    else:
        assert_valid(config)


# --- property: defaults are resolved where used, so overriding a field later equals naming it first ------

OVERRIDES = {
    "method": st.sampled_from(METHODS),
    "r": st.integers(1, 64),
    "lora_alpha": st.none() | st.integers(1, 64),
    "normalize": st.none() | st.sampled_from(NORMALIZATIONS),
    "use_rslora": st.booleans(),
}


@settings(max_examples=200, deadline=None)
@given(first=st.fixed_dictionaries({}, optional=OVERRIDES), later=st.fixed_dictionaries({}, optional=OVERRIDES))
def test_overriding_fields_after_the_fact_gives_what_naming_them_first_gives(first, later, tmp_path_factory):
    named = SCLoRAConfig(**{**first, **later})
    amended = SCLoRAConfig(**first).replace(**later)
    assert amended == named
    assert (amended.resolved_alpha, amended.resolved_normalize, amended.scaling) == \
        (named.resolved_alpha, named.resolved_normalize, named.scaling)
    folder = tmp_path_factory.mktemp("config")  # through save / load, as from_pretrained(...) then an override
    SCLoRAConfig(**first).save_pretrained(folder)
    assert SCLoRAConfig.from_pretrained(folder).replace(**later) == named
    # the defaults themselves: the method's own normalization, alpha = r
    assert named.resolved_alpha == ({**first, **later}.get("lora_alpha") or named.r)
    own = "abs_of_max" if named.method in ("corda_ipa", "corda_kpa", "guardspace") else "none"  # the authors'
    assert named.resolved_normalize == ({**first, **later}.get("normalize") or own)


def test_init_model_overrides_take_the_overridden_methods_defaults():
    from conftest import tiny_llama
    from peft import PeftModel

    from sclora import init_model

    model = init_model(tiny_llama(), SCLoRAConfig(), method="pissa", r=8)  # started as sc_lora, r=16
    assert isinstance(model, PeftModel)
    lora = model.peft_config["default"]
    assert (lora.r, lora.lora_alpha) == (8, 8)  # alpha = the new r, not the first config's 16
