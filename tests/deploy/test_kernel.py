"""The fused 1-bit kernel vs the simulated BiMaCo layers (the released model's layer shapes), the
stock-path fallback when the kernel cannot be built, and deploy layers under bf16 autocast."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bimacosr import kernels
from bimacosr.deploy import DeployBinaryConv2d, DeployBinaryLinear, set_mode, to_deploy
from bimacosr.deploy.check import LAYER_TOLERANCE
from bimacosr.quant import BiMaCoConv2d, BiMaCoLinear
from tests.conftest import KERNEL_FLAGS_ENV as FLAGS_ENV

TOL = LAYER_TOLERANCE["float32"]
REPO = Path(__file__).resolve().parents[2]


def _randomize(layer: nn.Module, seed: int, weight_zeros: bool = False) -> nn.Module:
    """Non-trivial bias / RPReLU, duplicate SMB positions, and optionally exact-zero weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "pr_" in name or name == "bias":
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (0.25 if "prelu" in name else 0.0))
        layer.skip_connection.indices_float[:, 1] = layer.skip_connection.indices_float[:, 0]
        if weight_zeros:
            layer.weight.view(-1)[::5] = 0.0  # sign(0) = 0 on the weight side
    return layer


def _input(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random input with exact zeros: scattered ones, and (4-D) an all-zero pixel (s = 0)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    x.view(-1)[::7] = 0.0
    if x.dim() == 4:
        x[-1, :, 1, 2] = 0.0
    return x


def _check(layer: nn.Module, sim: nn.Module, x: torch.Tensor, modes=("fused", "int")) -> None:
    with torch.no_grad():
        ref = sim(x)
    for mode in modes:
        with torch.inference_mode():
            out = set_mode(layer, mode)(x)
        assert out.shape == ref.shape, mode
        torch.testing.assert_close(out, ref, atol=TOL, rtol=0, msg=lambda m, mode=mode: f"{mode}: {m}")


RELEASED_CONVS = [  # (Cin, Cout, k, stride) of the released UNet; padding k // 2
    (160, 160, 3, 1),   # ResBlock conv, Cin == Cout: SMB + LRMB
    (160, 160, 3, 2),   # Downsample: avg-pool shortcut, side branches dropped (Q7)
    (320, 320, 3, 2),
    (160, 320, 3, 1),   # Cin != Cout
    (480, 160, 3, 1),   # Cin not a multiple of 64
    (1280, 640, 3, 1),  # widest
    (960, 640, 1, 1),   # ResBlock skip
    (192, 768, 1, 1),   # Swin MLP fc1 / patch embed
    (768, 192, 1, 1),
]


@pytest.mark.parametrize("cin,cout,k,stride", RELEASED_CONVS)
def test_fused_conv_equals_the_simulated_layer(fused, cin, cout, k, stride):
    torch.manual_seed(cin + cout + k)
    sim = _randomize(BiMaCoConv2d.from_float(nn.Conv2d(cin, cout, k, stride, k // 2)), cin)
    h, w = (5, 7) if stride == 1 else (6, 10)  # the Downsample's avg-pool shortcut needs even sizes
    modes = ("fused", "int") if cin * cout <= 320 * 320 else ("fused",)  # _int_mm is slow on AVX2
    _check(DeployBinaryConv2d.from_simulated(sim), sim, _input((2, cin, h, w), cout), modes)


@pytest.mark.parametrize("cin,cout,k,stride", [(70, 33, 3, 1), (64, 64, 3, 2), (5, 9, 1, 1)])
def test_fused_conv_with_zero_weights_and_odd_channels(fused, cin, cout, k, stride):
    torch.manual_seed(cin)
    sim = _randomize(BiMaCoConv2d.from_float(nn.Conv2d(cin, cout, k, stride, k // 2), rank=3), cin,
                     weight_zeros=True)
    layer = DeployBinaryConv2d.from_simulated(sim)
    assert (layer.signs() == 0).any()
    _check(layer, sim, _input((3, cin, 5, 7) if stride == 1 else (3, cin, 6, 4), cin))


def test_fused_conv_with_a_weight_zero_in_some_blocks_only(fused):
    """A weight zero sends only its own block of 16 outputs through the per-pixel masked path; the
    others keep the fast one. Zeros in the last, partial input word and in the last, partial block."""
    torch.manual_seed(5)
    sim = _randomize(BiMaCoConv2d.from_float(nn.Conv2d(130, 40, 3, 1, 1), rank=3), 5)
    with torch.no_grad():
        sim.weight[20, 129, 1, 1] = 0.0  # block 1
        sim.weight[37, 3, 0, 2] = 0.0    # block 2 (outputs 32-39)
    layer = DeployBinaryConv2d.from_simulated(sim)
    assert int((layer.signs() == 0).sum()) == 2
    _check(layer, sim, _input((2, 130, 5, 7), 5))


def test_fused_conv_on_a_channels_last_all_zero_input(fused):
    sim = _randomize(BiMaCoConv2d.from_float(nn.Conv2d(16, 24, 3, 1, 1), rank=2), 1)
    x = torch.zeros(1, 16, 4, 5).contiguous(memory_format=torch.channels_last)
    _check(DeployBinaryConv2d.from_simulated(sim), sim, x)


@pytest.mark.parametrize("cin,cout,shape,bias", [
    (192, 576, (4, 65, 192), True),    # Swin qkv on [windows, tokens, C] (3-D)
    (192, 192, (2, 3, 5, 192), True),  # more leading axes
    (160, 640, (5, 160), True),        # time embedding (2-D)
    (640, 1280, (1, 640), False),      # one row, no bias
    (70, 9, (3, 70), True),            # Cin not a multiple of 64
])
def test_fused_linear_equals_the_simulated_layer(fused, cin, cout, shape, bias):
    torch.manual_seed(cin + cout)
    sim = _randomize(BiMaCoLinear.from_float(nn.Linear(cin, cout, bias=bias)), cout)
    modes = ("fused", "int") if cin * cout <= 320 * 320 else ("fused",)
    _check(DeployBinaryLinear.from_simulated(sim), sim, _input(shape, cin), modes)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [40, 300])
def test_fused_side_branches_in_both_task_splits(fused, threads, rows):
    """With side branches a task takes all output blocks of its 32 pixels when there are at least
    4 tiles per thread (300 rows: 10 tiles, each task transposing its own), else fewer, as without
    them (40 rows: 2 tiles, transposed once each before the tasks and shared); partial last tile and
    partial last block either way."""
    torch.manual_seed(rows)
    sim = _randomize(BiMaCoLinear.from_float(nn.Linear(200, 72)), rows)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check(DeployBinaryLinear.from_simulated(sim), sim, _input((rows, 200), threads), ("fused",))
    finally:
        torch.set_num_threads(before)


def test_fused_linear_with_every_bit_differing(fused):
    """Inputs > 0 against weights < 0: every XOR bit is set, so with more than 31 words (Cin 2100)
    the AVX2 path's byte counters (8 per word) would overflow without their flush."""
    torch.manual_seed(5)
    sim = BiMaCoLinear.from_float(nn.Linear(2100, 20))
    with torch.no_grad():
        sim.weight.copy_(-sim.weight.abs() - 1e-3)
    layer = DeployBinaryLinear.from_simulated(sim)
    assert (layer.signs() == -1).all()
    _check(layer, sim, torch.rand(3, 2100) + 0.1)


@pytest.mark.parametrize("make,shape", [
    (lambda: BiMaCoConv2d.from_float(nn.Conv2d(160, 33, 3, 1, 1)), (2, 160, 5, 7)),  # partial block
    (lambda: BiMaCoConv2d.from_float(nn.Conv2d(64, 64, 3, 2, 1)), (1, 64, 6, 4)),    # shortcut layer
    (lambda: BiMaCoLinear.from_float(nn.Linear(70, 40)), (3, 4, 70)),
    (lambda: BiMaCoLinear.from_float(nn.Linear(71, 40)), (3, 4, 71)),  # odd Cin: a last pair half empty
])
def test_fused_layer_reads_and_writes_bf16_as_the_float_route_would(fused, make, shape):
    """A bf16 input goes to the kernel as is: the same bf16 values as float32 in, rounded out. Where
    the build multiplies bf16 side branches in bf16 pairs (``side_pairs()``), the LRMB's factors and
    first product and the SMB's values are rounded to bf16 as well (docs/kernel.md §4): the output is
    then the float route with those side branches, within one bf16 rounding; otherwise it is the
    float route bit for bit."""
    torch.manual_seed(3)
    sim = make()
    layer = (DeployBinaryConv2d if isinstance(sim, BiMaCoConv2d) else DeployBinaryLinear).from_simulated(sim, "fused")
    x = _input(shape, 4).bfloat16()
    x.view(-1)[1] = 3e38  # outputs near the top of the range: rounding may carry into inf
    with torch.inference_mode():
        out = layer(x)
        route = layer._forward(x.float())
    assert out.dtype == torch.bfloat16
    side = _side_on(layer, x)
    if not torch.ops.bimacosr.side_pairs() or side is None:
        assert torch.equal(out, route.to(torch.bfloat16))
        return
    in_float32, in_pairs, bound = side
    expected = route.double() - in_float32 + in_pairs
    ulp = torch.exp2(torch.floor(torch.log2(expected.abs().clamp_min(2.0 ** -126))) - 7)  # of bf16
    error = (out.double() - expected).abs()
    finite = expected.abs() < 3e38
    assert (error[finite] <= ulp[finite] + bound[finite]).all(), float((error - ulp - bound)[finite].max())
    assert not torch.equal(out, route.to(torch.bfloat16))  # the pairs were used


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_calls_go_straight_to_the_kernel_on_a_plan_made_once(fused, monkeypatch, dtype):
    """A call the kernel reads as it is (float32, or bf16 with the side branches in the kernel) runs
    the op on the layer's cached arguments: the output of the checked route bit for bit, one op
    call, the plan made once per mode, dtype and height; another mode, the Downsample's shortcut or
    float16 have no plan and take their routes."""
    calls = []
    op = kernels.binary_conv_op
    monkeypatch.setattr(kernels, "binary_conv_op", lambda *a: calls.append(a[0].shape) or op(*a))
    convs = [DeployBinaryConv2d.from_simulated(_randomize(BiMaCoConv2d.from_float(nn.Conv2d(64, 48, k, st, k // 2)), 1))
             for k, st in ((3, 1), (1, 1))]
    linear = DeployBinaryLinear.from_simulated(BiMaCoLinear.from_float(nn.Linear(70, 40)))
    for layer, x in ((convs[0], _input((2, 64, 5, 7), 1)), (convs[1], _input((1, 64, 4, 4), 2)),
                     (linear, _input((3, 4, 70), 3))):
        x = x.to(dtype, memory_format=torch.channels_last) if x.dim() == 4 else x.to(dtype)
        with torch.inference_mode():
            want = layer._forward(x)  # the route with its checks (autocast is off here)
            calls.clear()
            got = [layer(x), layer(x)]
        assert len(calls) == 2 and all(torch.equal(g, want) and g.dtype == dtype for g in got)
        plans = [key for key in layer._cache if key[0] == "plan"]
        assert len(plans) == 1 and layer._cache[plans[0]] is not None
        with torch.inference_mode():
            assert torch.equal(set_mode(layer, "int")(x), layer._forward(x.float()).to(dtype))
        assert layer._cache[("plan", "int", "auto", dtype, *plans[0][4:])] is None
        set_mode(layer, "auto")
    shortcut = DeployBinaryConv2d.from_simulated(BiMaCoConv2d.from_float(nn.Conv2d(64, 64, 3, 2, 1)))
    with torch.inference_mode():
        shortcut(_input((1, 64, 6, 4), 5).to(dtype))
        linear(_input((2, 70), 6).half())
    cpu = torch.device("cpu")
    assert shortcut._cache[("plan", "auto", "auto", dtype, 6, cpu)] is None
    assert linear._cache[("plan", "auto", "auto", torch.float16, 0, cpu)] is None


def _side_on(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """The layer's side branches on ``x`` (stride 1) in the layer's output layout, float64: as the
    float route computes them, as the kernel's pairs do (the LRMB's factors and first product and
    the SMB's values rounded to bf16), and the most one bf16 rounding of the first product can move
    them; None without side branches there."""
    if layer.lora_first is None or (isinstance(layer, DeployBinaryConv2d) and layer.stride != 1):
        return None
    first, second = layer.lora_first.double(), layer.lora_second.double()
    sparse = layer.smb_dense().double() if layer.smb_values is not None else torch.zeros_like(second @ first)
    rows = (x.movedim(1, -1) if x.dim() == 4 else x).double()
    low = rows @ first.t()
    low_pairs = (rows @ first.bfloat16().double().t()).float().bfloat16().double()
    in_pairs = low_pairs @ second.bfloat16().double().t() + rows @ sparse.bfloat16().double().t()
    bound = 2.0 ** -8 * low_pairs.abs() @ second.abs().t()
    back = (lambda t: t.movedim(-1, 1)) if x.dim() == 4 else (lambda t: t)
    return back(low @ second.t() + rows @ sparse.t()), back(in_pairs), back(bound)


def test_bf16_outputs_round_as_torch_also_for_nan_denormal_and_overflow(fused):
    """Outputs that are NaN (with a payload), denormal, past the largest bf16 or halfway between two
    bf16 values, among ordinary ones, come out as ``.to(torch.bfloat16)`` rounds the float32
    route's: the vectors holding NaN or denormals take the integer rounding (a native conversion
    would keep the payload and flush the denormals), the others the native one where there is one."""
    gen = torch.Generator().manual_seed(5)
    rows, cin, cout = 9, 64, 40
    x = torch.randn(1, 1, rows, cin, generator=gen).bfloat16()
    signs = (torch.randint(0, 2, (1, cin, cout), generator=gen) * 2 - 1).to(torch.int8)
    bits, mask = kernels.pack_weight_bits(signs)
    alpha, shift = torch.rand(cout, generator=gen) * 0.1, torch.randn(cout, generator=gen)
    special = {9: 1e-39, 10: -4e-41, 17: torch.tensor(0x7FA12345, dtype=torch.int32).view(torch.float32).item(),
               25: 3.4e38, 26: 1 + 2**-8, 33: -3.3e38}
    for channel, value in special.items():  # alpha 0: the output is the shift itself
        alpha[channel], shift[channel] = 0.0, value
    with torch.inference_mode():
        out = kernels.binary_conv(x, bits, mask, cout, alpha, shift, None, None, 1, 1, 0)
        want = kernels.binary_conv(x.float(), bits, mask, cout, alpha, shift, None, None, 1, 1, 0)
    assert out.dtype == torch.bfloat16 and torch.isnan(want[..., 17]).all()
    assert torch.equal(out.view(torch.int16), want.to(torch.bfloat16).view(torch.int16))
    assert (out[..., 9].float() == torch.tensor(1e-39).bfloat16().float()).all() and (out[..., 9] != 0).all()


def test_bf16_inputs_with_zeros_denormals_infinities_and_nan_pack_as_their_float_values(fused):
    """The bf16 input's sign bits and nonzero mask (read from the 16-bit patterns where the CPU has
    AVX-512BW) are those of the same values in float32: +0 and -0 are zero, denormals are not,
    +inf is positive, NaN is nonzero and not positive; placed inside whole 32-channel groups, in the
    vector loop (16 or 8 channels) and in the last word's scalar tail."""
    gen = torch.Generator().manual_seed(6)
    rows, cin, cout = 12, 150, 24
    x = torch.randn(1, 1, rows, cin, generator=gen)
    specials = [0.0, -0.0, 1e-39, -1e-39, float("inf"), float("-inf"), float("nan"), -float("nan")]
    for r in range(rows):
        for k, channel in enumerate((0, 31, 32, 63, 69, 140, 149)):
            if (r + k) % 3 == 0:
                x[0, 0, r, channel] = specials[(r + k) % len(specials)]
    x[0, 0, 0] = x[0, 0, 0].clamp(-2, 2).nan_to_num(0.0)  # rows 0 and 1: finite s, zeros and denormals
    x[0, 0, 1] = x[0, 0, 1].clamp(-2, 2).nan_to_num(0.0)
    x[0, 0, 1, 40:48] = torch.tensor([0.0, -0.0, 1e-39, -1e-39, 0.0, -0.0, 1e-39, -1e-39])
    x = x.bfloat16()
    signs = (torch.randint(0, 2, (1, cin, cout), generator=gen) * 2 - 1).to(torch.int8)
    bits, mask = kernels.pack_weight_bits(signs)
    alpha, shift = torch.rand(cout, generator=gen), torch.randn(cout, generator=gen)
    with torch.inference_mode():
        out = kernels.binary_conv(x, bits, mask, cout, alpha, shift, None, None, 1, 1, 0)
        want = kernels.binary_conv(x.float(), bits, mask, cout, alpha, shift, None, None, 1, 1, 0)
    assert torch.isfinite(want[0, 0, :2]).all() and not torch.isfinite(want[0, 0, 2:]).all()
    assert torch.equal(out.view(torch.int16), want.to(torch.bfloat16).view(torch.int16))


def test_bf16_sparse_values_round_to_bf16_where_side_branches_run_in_pairs(fused):
    """A bf16 call's SMB multiplies its values rounded to bf16 where the build multiplies bf16 side
    branches in pairs (``side_pairs()``, docs/kernel.md §4), the float32 values otherwise: with
    1 + 2^-10 on channel 0 and 2^-8 - 1 on channel 3 of an all-ones input (the binary branch 0:
    alpha = shift = 0), output 0 is 2^-8 in pairs and 2^-8 + 2^-10 in float32, both exact in bf16."""
    cin, cout = 8, 16
    x = torch.ones(1, 1, 2, cin, dtype=torch.bfloat16)
    bits, mask = kernels.pack_weight_bits(torch.ones(1, cin, cout, dtype=torch.int8))
    zero = torch.zeros(cout)
    sparse = kernels.pack_sparse(torch.tensor([[0, 0], [0, 3]]), torch.tensor([1 + 2 ** -10, 2 ** -8 - 1]), cout)
    with torch.inference_mode():
        out = kernels.binary_conv(x, bits, mask, cout, zero, zero, None, None, 1, 1, 0, sparse=sparse).float()
    assert (out[..., 0] == (2 ** -8 if torch.ops.bimacosr.side_pairs() else 2 ** -8 + 2 ** -10)).all()
    assert (out[..., 1:] == 0).all()


@pytest.fixture
def no_compiler(monkeypatch):
    """The kernel's build fails as without a compiler; the loader starts afresh."""
    def fail() -> None:
        raise RuntimeError("Error building extension: g++: command not found")

    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setattr(kernels, "_build", fail)


def test_fallback_to_the_stock_path_when_the_kernel_cannot_build(no_compiler, capsys):
    torch.manual_seed(2)
    sim = _randomize(BiMaCoConv2d.from_float(nn.Conv2d(24, 40, 3, 1, 1), rank=2), 2)
    layer = DeployBinaryConv2d.from_simulated(sim)  # mode "auto"
    x = _input((2, 24, 6, 5), 3)
    with torch.inference_mode():
        out, again = layer(x), layer(x)
    with torch.no_grad():
        torch.testing.assert_close(out, sim(x), atol=TOL, rtol=0)
    assert torch.equal(out, again) and layer._path() == "int"
    err = capsys.readouterr().err
    assert err.count("bimacosr:") == 1, err  # printed once
    assert "fused 1-bit kernel unavailable (RuntimeError: Error building extension" in err
    assert "stock PyTorch int8 path" in err
    with pytest.raises(RuntimeError, match="'fused' needs the compiled kernel.*g\\+\\+"):
        set_mode(layer, "fused")(x)


def test_kernel_env_off_keeps_auto_on_the_stock_path(no_compiler, monkeypatch, capsys):
    monkeypatch.setenv(kernels.ENV, "off")
    layer = DeployBinaryLinear.from_simulated(BiMaCoLinear.from_float(nn.Linear(8, 4)))
    assert layer._path() == "int" and not kernels.available()
    assert f"({kernels.ENV}=off)" in capsys.readouterr().err


def test_weight_bits_layout():
    taps = torch.zeros(2, 70, 18, dtype=torch.int8)  # [T, Cin, Cout]: 2 blocks of 16, one padded
    taps[1, :3, 5] = torch.tensor([1, -1, 0], dtype=torch.int8)
    taps[1, 3:, 5] = 1
    taps[0, 64, 17] = 1
    bits, mask = kernels.pack_weight_bits(taps)
    assert bits.shape == mask.shape == (2, 2, 2, 16) and bits.dtype == torch.int64
    lane = kernels.LANE_ORDER.index(5)  # output 5 of block 0
    assert int(bits[1, 0, 0, lane]) & 0b111 == 0b001 and int(mask[1, 0, 0, lane]) & 0b111 == 0b011
    assert int(bits[1, 0, 1, lane]) == int(mask[1, 0, 1, lane]) == 0b111111  # channels 64..69, pad bits 0
    assert int(bits[0, 1, 1, kernels.LANE_ORDER.index(1)]) == 1  # output 17 = block 1, output 1
    assert int(bits.count_nonzero()) == 3 and int(mask[0].count_nonzero()) == 1  # the rest: zeros
    assert sorted(kernels.LANE_ORDER) == list(range(16))
    assert kernels.pack_weight_bits(torch.ones(9, 3, 2, dtype=torch.int8))[1].numel() == 0


def test_sparse_branch_as_rows_of_outputs():
    indices = torch.tensor([[2, 0, 2, 17, 2], [1, 3, 1, 0, 0]])  # (output, input); (2, 1) twice
    rowptr, cols, vals = kernels.pack_sparse(indices, torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), 18)
    assert rowptr.tolist() == [0, 1, 1] + [3] * 15 + [4] * 15  # 32 rows: two blocks of 16 outputs
    assert cols.tolist() == [3, 0, 1, 0] and vals.tolist() == [2.0, 5.0, 4.0, 4.0]  # duplicates add up


def test_deploy_model_under_bf16_autocast(tiny_bimaco_denoiser):
    """A whole deploy model runs under bf16 autocast; each deploy layer computes in fp32 inside
    (its output equals the one without autocast on the same input) and returns the input dtype.
    Copies are kept: the model adds residuals in place into layer outputs."""
    deployed = to_deploy(copy.deepcopy(tiny_bimaco_denoiser))
    seen: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda m, args, out: seen.append((m, args[0].clone(), out.clone())))
             for m in deployed.modules() if isinstance(m, (DeployBinaryConv2d, DeployBinaryLinear))]
    gen = torch.Generator().manual_seed(0)
    x, lq = torch.randn(2, 3, 64, 64, generator=gen), torch.rand(2, 3, 64, 64, generator=gen)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = deployed(x, torch.tensor([0, 3]), lq=lq)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert len(seen) == len(hooks)
    for hook in hooks:
        hook.remove()
    assert any(inp.dtype == torch.bfloat16 for _, inp, _ in seen)
    with torch.inference_mode():
        for module, inp, got in seen:
            assert got.dtype == inp.dtype
            assert torch.equal(got, module(inp)), module


@pytest.mark.slow
def test_every_released_layer_equals_its_simulated_twin_at_released_size(fused):
    """Batch 2, non-square 64x128 latent: each binary layer of the released UNet (random weights),
    on the input it gets in the simulated model, vs its fused deploy twin."""
    from bimacosr.build import build_denoiser_from_config
    from bimacosr.config import load_config
    from bimacosr.smoke import randomize
    torch.manual_seed(0)
    model = randomize(build_denoiser_from_config(load_config(REPO / "configs" / "BiMaCoSR.yaml"), "student")).eval()
    errors: dict[str, float] = {}

    def compare(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            twin = (DeployBinaryConv2d if isinstance(module, BiMaCoConv2d) else DeployBinaryLinear) \
                .from_simulated(module, "fused")
            errors[name] = float((twin(args[0]) - output).abs().max())
        return hook

    for name, module in model.named_modules():
        if isinstance(module, (BiMaCoConv2d, BiMaCoLinear)):
            module.register_forward_hook(compare(name))
    gen = torch.Generator().manual_seed(1)
    x, lq = torch.randn(2, 3, 64, 128, generator=gen), torch.rand(2, 3, 64, 128, generator=gen) * 2 - 1
    with torch.no_grad():
        model(x, torch.tensor([0, 2]), lq=lq)
    assert len(errors) == sum(isinstance(m, (BiMaCoConv2d, BiMaCoLinear)) for m in model.modules())
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL, f"{worst}: max abs error {errors[worst]:.2e}"


PAIRS = "-DBIMACOSR_EMULATE_DOT_PAIRS"  # bf16 side branches in pairs, written out (vec.h)
TEST_BUILDS = [  # (path, test-build flags on a CPU with AVX-512 VPOPCNTDQ, on an AVX2-only CPU)
    ("AVX-512 VPOPCNTDQ popcount", None, f"-DBIMACOSR_EMULATE_LANE_POPCOUNT {PAIRS}"),
    ("AVX2 nibble-table popcount", f"-mno-avx512f {PAIRS}", None),  # as an AVX2-only CPU builds it
    ("AVX2 nibble-table popcount", "-mno-avx512vpopcntdq", None),  # AVX-512 without VPOPCNTDQ: 4 rows
    ("portable popcount", "-mno-avx2", "-mno-avx2"),  # side branches in float32
]


@pytest.mark.slow
def test_every_other_popcount_path_on_a_test_build(fused):
    """A build runs one popcount path, the one the tests above cover. This runs the others, each on
    a test build of the same source: on a CPU with AVX-512 VPOPCNTDQ the AVX2 nibble table as an
    AVX2-only CPU builds it (``-mno-avx512f``) and as an AVX-512 CPU without VPOPCNTDQ does
    (``-mno-avx512vpopcntdq``), and the portable loop (``-mno-avx2``); on an AVX2 CPU the 8-lane
    path with its popcount emulated (``-DBIMACOSR_EMULATE_LANE_POPCOUNT``) and the portable loop.
    The builds with ``-DBIMACOSR_EMULATE_DOT_PAIRS`` multiply bf16 side branches in written-out
    pairs, the portable one in float32, so that both forms run wherever the native build has the other.
    Each build also runs the window attention and GroupNorm kernel tests at its vector widths."""
    native = torch.ops.bimacosr.path()
    if native not in ("AVX-512 VPOPCNTDQ popcount", "AVX2 nibble-table popcount"):
        pytest.skip(f"a CPU without AVX2 ({native}) builds no other path")
    column = 1 if native.startswith("AVX-512") else 2
    built = []
    for build in TEST_BUILDS:
        name, flags = build[0], build[column]
        if name == native or flags is None:
            continue
        env = {**os.environ, FLAGS_ENV: flags}
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", __file__,
                                 str(Path(__file__).with_name("test_bound.py")),
                                 str(REPO / "tests/models/test_fast_forms.py"),
                                 "-k", "equals_the_simulated or zero_weights or all_zero or every_bit or probe "
                                       "or mixed or bf16 or window_attention_kernel or group_norm_kernel",
                                 "-m", "not slow"],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{flags}: " + result.stdout[-3000:] + result.stderr[-3000:]
        assert f"kernel ({name}" in output or (name.startswith("AVX-512") and "(lane popcount, emulated" in output), \
            f"{flags} did not build {name}: {output[-500:]}"
        sides = ("bf16 side branches in bf16 pairs (written out" if PAIRS in flags else
                 "; side branches in float32;" if "-mno-avx2" in flags else "side branches in ")
        assert sides in output, f"{flags} did not build {sides}: {output[-500:]}"
        assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-500:]
        built.append(flags)
    assert len(built) == (3 if column == 1 else 2), built
