"""sclora.layers: every layout's weight read as the dense (out, in) matrix its forward computes with, and written back
in the layer's own format; layouts it cannot handle refused up front, by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from sclora.layers import (
    check_supported,
    cpu_kernel_fits,
    layer_dims,
    layer_kind,
    read_weight,
    without_cpu_repacking,
    write_weight,
)

bnb = pytest.importorskip("bitsandbytes", reason="the quantized layouts need bitsandbytes (dev extra)")
import bitsandbytes.functional as F

D_IN, D_OUT = 128, 64
X = torch.randn(5, D_IN, generator=torch.Generator().manual_seed(0))


def dense(seed=1, scale=0.3):
    return torch.randn(D_OUT, D_IN, generator=torch.Generator().manual_seed(seed)) * scale


def linear4bit(quant_type="nf4", storage=torch.uint8, nested=False, dtype=torch.float32, cpu_kernel=False):
    layer = bnb.nn.Linear4bit(D_IN, D_OUT, bias=True, compute_dtype=torch.float32, quant_type=quant_type,
                              compress_statistics=nested, quant_storage=storage, device="meta")
    layer.weight = bnb.nn.Params4bit(dense().to(dtype), requires_grad=False, quant_type=quant_type,
                                     compress_statistics=nested, quant_storage=storage, module=layer)
    layer.bias = nn.Parameter(torch.full((D_OUT,), 0.1), requires_grad=False)
    layer.support_avx512bf16_for_cpu = layer.support_avx512bf16_for_cpu and cpu_kernel
    return layer.to("cpu").eval()


def linear8bit():
    layer = bnb.nn.Linear8bitLt(D_IN, D_OUT, bias=True, has_fp16_weights=False, threshold=0.0)
    layer.weight = bnb.nn.Int8Params(dense().clone(), requires_grad=False, has_fp16_weights=False)
    return layer.to("cpu").eval()


def test_dense_layouts_read_as_out_by_in_and_write_in_their_own_orientation():
    lin = nn.Linear(D_IN, D_OUT)
    conv = Conv1D(D_OUT, D_IN)
    for layer in (lin, conv):
        assert layer_dims(layer) == (D_IN, D_OUT)
        w = read_weight(layer, torch.float64)
        assert w.shape == (D_OUT, D_IN)
        with torch.no_grad():  # the forward is x W^T + b with the weight read
            torch.testing.assert_close(layer(X).double(), X.double() @ w.T + layer.bias.double(), rtol=1e-5, atol=1e-5)
        new = dense(seed=3)
        write_weight(layer, new)
        assert torch.equal(read_weight(layer), new)
    assert torch.equal(conv.weight, dense(seed=3).T)  # stored (in, out)
    assert read_weight(lin) is not None and read_weight(lin).data_ptr() == lin.weight.data_ptr()  # no copy


def test_write_refuses_a_weight_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"takes \(64, 128\)"):
        write_weight(Conv1D(D_OUT, D_IN), torch.zeros(D_IN, D_OUT))


def codebook_bound(state, weight):
    """Largest error bitsandbytes' 4-bit rounding can make: half the widest gap of the code table times each
    block's absmax (the nearest code is chosen)."""
    code = state.code.float().sort().values
    half_gap = (code[1:] - code[:-1]).max() / 2
    absmax = weight.reshape(-1, state.blocksize).abs().amax(1, keepdim=True)
    return (half_gap * absmax).expand(-1, state.blocksize).reshape(weight.shape)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16], ids=["uint8", "bf16-storage"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_4bit_reads_its_dequantization_and_writes_the_same_format(quant_type, storage, nested):
    layer = linear4bit(quant_type, storage, nested)
    w = read_weight(layer, torch.float64)
    fresh = F.dequantize_4bit(*F.quantize_4bit(dense(), quant_type=quant_type, compress_statistics=nested,
                                               quant_storage=storage), quant_type=quant_type)
    assert torch.equal(w, fresh.double())  # exactly bitsandbytes' own round trip of the weight
    if not nested:  # (nested statistics also round the block scales, in 8 bits)
        assert ((w - dense().double()).abs() <= codebook_bound(layer.weight.quant_state, dense()).double() + 1e-6).all()
    with torch.no_grad():  # what the forward computes with
        torch.testing.assert_close(layer(X).double(), X.double() @ w.T + 0.1, rtol=1e-4, atol=1e-4)

    module, new = layer, dense(seed=3, scale=0.1)
    write_weight(layer, new)
    assert layer is module and layer.weight.module is layer and layer.quant_state is layer.weight.quant_state
    state = layer.weight.quant_state
    assert isinstance(layer.weight, bnb.nn.Params4bit) and not layer.weight.requires_grad
    assert (state.quant_type, state.blocksize, state.nested, layer.weight.dtype, state.dtype) == (
        quant_type, 64, nested, storage, torch.float32)
    back = read_weight(layer)
    want = F.dequantize_4bit(*F.quantize_4bit(new, quant_type=quant_type, compress_statistics=nested,
                                              quant_storage=storage), quant_type=quant_type)
    assert torch.equal(back, want)
    if not nested:
        assert ((back - new).abs() <= codebook_bound(state, new) + 1e-6).all()


def test_4bit_in_the_cpu_kernels_packed_layout_reads_what_that_kernel_computes_with():
    layer = linear4bit(cpu_kernel=True)
    if not layer.support_avx512bf16_for_cpu:  # no AVX512-BF16: bitsandbytes keeps the generic layout
        assert_forward_keeps_the_storage(layer)
        return
    before = read_weight(layer, torch.float64)
    with torch.no_grad():
        out = layer(X)  # repacks: bf16 block scales, another nibble order
    assert layer.weight.quant_state.packing_format_for_cpu
    packed = read_weight(layer, torch.float64)
    scale = before.abs().max()
    assert (packed - before).abs().max() <= 2**-8 * scale  # only the block scales' bf16 rounding
    torch.testing.assert_close(out.double(), X.double() @ packed.T + 0.1, rtol=2e-2, atol=2e-2)  # bf16 compute
    write_weight(layer, packed)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(read_weight(layer, torch.float64), packed)  # on the grid already: requantized exactly


def assert_forward_keeps_the_storage(layer):
    """A forward on bitsandbytes' generic path leaves the stored 4-bit weight as it was and computes with it."""
    stored = layer.weight.data.clone()
    with torch.no_grad():
        out = layer(X)
    assert torch.equal(layer.weight.data, stored)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    torch.testing.assert_close(out.double(), X.double() @ read_weight(layer, torch.float64).T + 0.1,
                               rtol=1e-5, atol=1e-5)


def relative_error(out, want):
    return ((out.double() - want).norm() / want.norm()).item()


def test_8bit_reads_cb_times_scb_and_requantizes_row_wise():
    layer = linear8bit()
    w = read_weight(layer, torch.float64)
    rows = dense().abs().amax(1, keepdim=True).double()
    # the nearest of 127 steps of each row's absmax (of the weight in float16, as bitsandbytes quantizes it)
    assert ((w - dense().double()).abs() <= rows * (0.5 / 127 + 2**-10)).all()
    with torch.no_grad():
        out = layer(X)  # moves CB / SCB from the weight into layer.state
    assert torch.equal(read_weight(layer, torch.float64), w)
    assert relative_error(out, X.double() @ w.T + layer.bias.double()) < 2e-2  # (LLM.int8() rounds the inputs too)
    new = dense(seed=3, scale=0.1)
    write_weight(layer, new)
    assert isinstance(layer.weight, bnb.nn.Int8Params) and layer.weight.dtype == torch.int8
    back = read_weight(layer, torch.float64)
    assert ((back - new.double()).abs() <= new.abs().amax(1, keepdim=True).double() * (0.5 / 127 + 2**-10)).all()
    with torch.no_grad():
        assert relative_error(layer(X), X.double() @ back.T + layer.bias.double()) < 2e-2


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(2, 2))


def test_unsupported_layouts_are_refused_by_name_before_any_work():
    int_weight = nn.Linear(4, 4)
    int_weight.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    meta = nn.Linear(4, 4, device="meta")
    unquantized = bnb.nn.Linear4bit(D_IN, D_OUT, quant_type="nf4")  # not moved to a device: never quantized
    for layer, said in ((int_weight, "stores its weight as Tensor of torch.int8"), (meta, "meta device"),
                        (unquantized, "not quantized yet"), (Scaled(), "is not a layer sclora can adapt")):
        with pytest.raises(ValueError, match=said) as err:
            check_supported({"model.layers.0.mlp.odd": layer})
        assert "'model.layers.0.mlp.odd'" in str(err.value) and type(layer).__name__ in str(err.value)
    check_supported({"a": nn.Linear(2, 2), "b": Conv1D(2, 2), "c": linear4bit(), "d": linear8bit()})
    assert [layer_kind(m) for m in (nn.Linear(2, 2), Conv1D(2, 2), linear4bit(), linear8bit(), Scaled())] == [
        "linear", "conv1d", "4bit", "8bit", None]


def test_a_4bit_shape_the_cpu_kernel_cannot_run_is_written_onto_the_generic_path():
    layer = bnb.nn.Linear4bit(96, 64, bias=False, quant_type="nf4", device="meta")  # in_features: no multiple of 64
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 96), requires_grad=False, quant_type="nf4", module=layer)
    layer = layer.to("cpu").eval()
    assert not cpu_kernel_fits(layer) and cpu_kernel_fits(linear4bit())
    check_supported({"down_proj": layer})  # sclora reads and writes it
    new = torch.randn(64, 96) * 0.1
    write_weight(layer, new)
    assert not layer.support_avx512bf16_for_cpu  # else bitsandbytes' own forward fails with a reshape error
    x = torch.randn(2, 96)
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), x.double() @ read_weight(layer, torch.float64).T,
                                   rtol=1e-5, atol=1e-5)


def test_without_cpu_repacking_leaves_the_storage_as_it_was():
    layer = linear4bit(cpu_kernel=True)
    if not layer.support_avx512bf16_for_cpu:  # no AVX512-BF16: there is nothing to switch off, storage stays
        assert_forward_keeps_the_storage(layer)
        return
    model = nn.Sequential(layer)
    stored = layer.weight.data.clone()
    with without_cpu_repacking(model), torch.no_grad():
        out = model(X)
    assert torch.equal(layer.weight.data, stored) and not getattr(layer.weight.quant_state, "packing_format_for_cpu",
                                                                  False)
    assert layer.support_avx512bf16_for_cpu  # restored
    torch.testing.assert_close(out.double(), X.double() @ read_weight(layer, torch.float64).T + 0.1,
                               rtol=1e-5, atol=1e-5)  # the generic path: float32 matmuls
