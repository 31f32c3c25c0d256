"""Deploy layers vs the simulated BiMaCo layers on random shapes; int path vs float path."""
import copy

import pytest
import torch
from torch import nn

from bimacosr.deploy import DeployBinaryConv2d, DeployBinaryLinear, int_matmul, set_mode, to_deploy
from bimacosr.quant import BiMaCoConv2d, BiMaCoLinear
from tests.conftest import compiled_run

TOL = 1e-4
MODES = [("int", "sparse"), ("int", "dense"), ("float", "sparse"), ("float", "dense")]


def _randomize(layer: nn.Module, seed: int) -> nn.Module:
    """Non-trivial RPReLU / bias values and SMB indices that are neither integral nor unique (Q14)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "pr_" in name or name == "bias":
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (0.25 if "prelu" in name else 0.0))
        smb = getattr(layer, "skip_connection", None)
        if smb is not None:
            idx = smb.indices_float
            idx += (torch.rand(idx.shape, generator=gen) - 0.5) * 0.8  # rounds back (Q14)
            idx[:, 1] = idx[:, 0].round()  # a duplicate position: values add up
    return layer


def _input(shape, seed: int) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    x.view(-1)[::7] = 0.0  # sign(0) = 0 (Q11)
    if x.dim() == 4:
        x[0, :, 0, 0] = 0.0  # an all-zero pixel: s = 0
    return x


CONVS = [  # (Cin, Cout, k, stride, padding, H, W)
    (12, 20, 3, 1, 1, 9, 11),    # 3x3, Cin != Cout
    (16, 16, 3, 1, 1, 8, 7),     # 3x3, Cin == Cout: SMB + LRMB
    (16, 16, 3, 2, 1, 10, 6),    # Downsample: avg-pool shortcut (Q7)
    (8, 8, 3, 2, 1, 8, 8),
    (7, 13, 1, 1, 0, 5, 6),      # 1x1, odd channel counts
    (24, 8, 1, 1, 0, 4, 4),
    (16, 16, 1, 2, 0, 6, 6),     # 1x1 stride 2
]


@pytest.mark.parametrize("cin,cout,k,stride,padding,h,w", CONVS)
def test_conv_matches_the_simulated_layer(cin, cout, k, stride, padding, h, w):
    torch.manual_seed(cin * 100 + cout + stride)
    sim = _randomize(BiMaCoConv2d.from_float(nn.Conv2d(cin, cout, k, stride, padding), rank=4), cin + k)
    x = _input((2, cin, h, w), cout)
    with torch.no_grad():
        ref = sim(x)
    outs = {}
    for mode, side in MODES:
        layer = DeployBinaryConv2d.from_simulated(sim, mode, side)
        with torch.inference_mode():
            outs[mode, side] = out = layer(x)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, atol=TOL, rtol=0)
    torch.testing.assert_close(outs["int", "sparse"], outs["float", "sparse"], atol=TOL, rtol=0)
    assert layer.side_dropped == (cin == cout and stride > 1)


@pytest.mark.parametrize("if_smb,if_lora", [(False, True), (True, False), (False, False)])
def test_conv_without_branches_and_bias(if_smb, if_lora):
    torch.manual_seed(3)
    fp = nn.Conv2d(10, 14, 3, padding=1, bias=False)
    sim = _randomize(BiMaCoConv2d.from_float(fp, rank=3, if_LRMB=if_lora, if_SMB=if_smb), 5)
    x = _input((1, 10, 6, 5), 2)
    layer = DeployBinaryConv2d.from_simulated(sim)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), sim(x), atol=TOL, rtol=0)
    assert (layer.smb_values is None) != if_smb and (layer.lora_first is None) != if_lora


@pytest.mark.parametrize("shape", [(5, 30), (2, 7, 30), (1, 30)])
@pytest.mark.parametrize("mode,side", MODES)
def test_linear_matches_the_simulated_layer(shape, mode, side):
    torch.manual_seed(4)
    sim = _randomize(BiMaCoLinear.from_float(nn.Linear(30, 22), rank=4), 6)
    x = _input(shape, 7)
    layer = DeployBinaryLinear.from_simulated(sim, mode, side)
    with torch.inference_mode():
        out = layer(x)
    with torch.no_grad():
        torch.testing.assert_close(out, sim(x), atol=TOL, rtol=0)


def test_binarized_once_and_move0_threshold_dropped():
    torch.manual_seed(5)
    sim = BiMaCoConv2d.from_float(nn.Conv2d(6, 10, 3, padding=1))
    layer = DeployBinaryConv2d.from_simulated(sim)
    assert layer.taps.dtype == torch.int8 and layer.taps.shape == (9, 6, 10)
    assert torch.equal(layer.signs(), torch.sign(sim.weight).to(torch.int8))
    torch.testing.assert_close(layer.alpha, sim.weight.abs().mean(dim=(1, 2, 3)), atol=0, rtol=0)
    names = [n for n, _ in layer.named_buffers()] + [n for n, _ in layer.named_parameters()]
    assert not any("move0" in n or "threshold" in n or n == "weight" for n in names)
    lin = DeployBinaryLinear.from_simulated(BiMaCoLinear.from_float(nn.Linear(9, 4)))
    assert lin.signs_t.dtype == torch.int8 and "channel_threshold" not in dict(lin.named_buffers())


def test_int_matmul_is_exact():
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-1, 2, (37, 1031), generator=gen, dtype=torch.int8)
    b = torch.randint(-1, 2, (1031, 13), generator=gen, dtype=torch.int8)
    out = int_matmul(a, b)
    assert out.dtype == torch.int32
    assert torch.equal(out, (a.long() @ b.long()).int())


def test_other_input_dtypes_are_computed_in_float32():
    torch.manual_seed(6)
    sim = BiMaCoConv2d.from_float(nn.Conv2d(8, 8, 1))
    layer = DeployBinaryConv2d.from_simulated(sim).half()  # buffers stay float32
    assert layer.alpha.dtype == torch.float32
    x = torch.randn(1, 8, 4, 4)
    with torch.inference_mode():
        out = layer(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(out.float(), sim(x.to(torch.bfloat16).float()), atol=0.05, rtol=0.01)


def test_downsample_refuses_the_one_pixel_case_it_cannot_compute():
    sim = BiMaCoConv2d.from_float(nn.Conv2d(8, 8, 3, 2, 1))
    layer = DeployBinaryConv2d.from_simulated(sim)
    with pytest.raises(RuntimeError, match="Q7"):
        layer(torch.randn(1, 8, 1, 4))


def test_to_deploy_and_set_mode_on_a_model():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1),
                          BiMaCoConv2d.from_float(nn.Conv2d(8, 8, 3, padding=1), rank=2),
                          nn.GroupNorm(4, 8),
                          BiMaCoConv2d.from_float(nn.Conv2d(8, 16, 1), rank=2))
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        ref = model(x)
    deployed = to_deploy(copy.deepcopy(model))
    assert isinstance(deployed[0], nn.Conv2d) and isinstance(deployed[2], nn.GroupNorm)
    assert isinstance(deployed[1], DeployBinaryConv2d) and isinstance(deployed[3], DeployBinaryConv2d)
    with torch.inference_mode():
        torch.testing.assert_close(deployed(x), ref, atol=TOL, rtol=0)
        set_mode(deployed, "float", "dense")
        assert deployed[1].mode == "float" and deployed[3].side == "dense"
        torch.testing.assert_close(deployed(x), ref, atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="mode"):
        set_mode(deployed, "int4")
    with torch.inference_mode():  # copies drop the runtime caches (a CSR tensor cannot be copied)
        torch.testing.assert_close(copy.deepcopy(set_mode(deployed, "int", "sparse"))(x), ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("mode", ["auto", "int"])
def test_a_used_layer_loads_new_values_whole(mode):
    """load_state_dict into a layer that has run replaces what it computed from the old values
    (packed signs, side branch forms, the epilogue's shift, the kernel plan): its output is then
    the other layer's, not a mix."""
    pairs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        conv = _randomize(BiMaCoConv2d.from_float(nn.Conv2d(16, 16, 3, 1, 1)), seed)
        linear = _randomize(BiMaCoLinear.from_float(nn.Linear(20, 12)), seed)
        pairs.append((DeployBinaryConv2d.from_simulated(conv, mode), DeployBinaryLinear.from_simulated(linear, mode)))
    for used, other, x in zip(pairs[0], pairs[1], (_input((1, 16, 8, 7), 2), _input((3, 20), 3))):
        with torch.inference_mode():
            before, want = used(x), other(x)
            used.load_state_dict(other.state_dict())
            got = used(x)
        assert not torch.equal(before, want) and torch.equal(got, want)


def test_a_compiled_model_runs_its_deploy_layers_eagerly(fused):
    """``torch.compile`` (``--compile``) leaves the deploy layers to eager mode: dynamo would
    otherwise compile their forward once per layer (the fused op and the cached plan are opaque to
    it) and give up past its recompile limit with a warning, on every model of more than 8 layers."""
    torch.manual_seed(0)
    layers = nn.Sequential(*[DeployBinaryLinear.from_simulated(BiMaCoLinear.from_float(nn.Linear(16 + i, 17 + i)), "fused")
                             for i in range(10)])
    x = torch.randn(4, 16)
    out, recompiles = compiled_run(layers, x)
    with torch.inference_mode():
        assert torch.equal(out, layers(x))
    assert not recompiles
