"""Table 1 baseline layers (docs/baselines.md): fixture parity, from_float, keys, BiDM's fliter_k."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bimacosr.parity import check_file
from bimacosr.quant.baselines import (BASELINE_LAYERS, BBCUConv2d, BBCULinear, BiDMConv2d,
                                      ReActNetConv2d, ReActNetLinear, ReSTEConv2d, ReSTELinear,
                                      XNORConv2d, XNORLinear)
from bimacosr.quant.common import QuantLayer
from tests.conftest import FIXTURES

torch.set_num_threads(2)

BASELINE_FIXTURES = FIXTURES / "baselines"
FIXTURE_NAMES = [f"{b}_{case}.pt" for b in ("xnor", "reactnet", "bbcu", "reste", "bidm", "horq")
                 for case in ("conv", "conv_k1", "linear", "linear_proj")]

# config name -> (class built, XNOR/HORQ order or None)
EXPECTED_CLASS = {
    "BinaryConv2d_XNOR": (XNORConv2d, 1), "BinaryLinear_XNOR": (XNORLinear, 1),
    "BinaryConv2d_HORQ": (XNORConv2d, 2), "BinaryLinear_HORQ": (XNORLinear, 2),
    "BinaryConv2d_reactnet": (ReActNetConv2d, None), "BinaryLinear_reactnet": (ReActNetLinear, None),
    "BinaryConv2d_BBCU": (BBCUConv2d, None), "BinaryLinear_BBCU": (BBCULinear, None),
    "BinaryConv2d_ReSTE": (ReSTEConv2d, None), "BinaryLinear_ReSTE": (ReSTELinear, None),
    "BinaryConv2d_BiDM": (BiDMConv2d, None), "BinaryLinear_BiDM": (ReActNetLinear, None),
}


def fp_layer(config_name: str, bias: bool = True, cin: int = 4, cout: int = 6, k: int = 3,
             stride: int = 1, padding: int = 1) -> nn.Module:
    if "Conv2d" in config_name:
        return nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=bias)
    return nn.Linear(cin, cout, bias=bias)


def test_fixture_set_is_complete():
    assert sorted(p.name for p in BASELINE_FIXTURES.glob("*.pt")) == sorted(FIXTURE_NAMES)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture(name):
    checks = check_file(BASELINE_FIXTURES / name)
    failures = [c.line() for c in checks if not c.passed]
    assert not failures, "\n".join(failures)
    names = {c.name for c in checks}
    for dtype in ("float64", "float32"):
        assert {f"{name} {dtype} output", f"{name} {dtype} grad_input",
                f"{name} {dtype} grad_weight"} <= names
    if name.startswith("bidm_conv"):
        assert f"{name} float64 output_fliter_k_reset" in names


def test_name_table_is_complete():
    assert set(BASELINE_LAYERS) == set(EXPECTED_CLASS)


@pytest.mark.parametrize("config_name", sorted(EXPECTED_CLASS))
@pytest.mark.parametrize("bias", [True, False])
def test_from_float_shares_fp_parameters(config_name, bias):
    fp = fp_layer(config_name, bias=bias, stride=2).double()
    layer = BASELINE_LAYERS[config_name](fp)
    cls, order = EXPECTED_CLASS[config_name]
    assert type(layer) is cls and isinstance(layer, QuantLayer)
    if order is not None:
        assert layer.order == order
    assert layer.weight is fp.weight
    assert layer.bias is fp.bias if bias else layer.bias is None
    if isinstance(fp, nn.Conv2d):
        assert (layer.in_channels, layer.out_channels) == (fp.in_channels, fp.out_channels)
        assert (layer.kernel_size, layer.stride, layer.padding) == ((3, 3), (2, 2), (1, 1))
    else:
        assert (layer.in_features, layer.out_features) == (fp.in_features, fp.out_features)
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    # the shared weight really is the one used: changing the FP weight changes the output
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64) if isinstance(fp, nn.Conv2d) else \
        torch.randn(3, 4, dtype=torch.float64)
    y0 = layer(x)
    with torch.no_grad():
        fp.weight.neg_()
    assert not torch.allclose(layer(x), y0)


@pytest.mark.parametrize("config_name", sorted(EXPECTED_CLASS))
def test_from_float_rejects_quant_config(config_name):
    cls, _ = EXPECTED_CLASS[config_name]
    with pytest.raises(ValueError, match=r"set conv_quant_config/linear_quant_config to \{\}") as info:
        BASELINE_LAYERS[config_name](fp_layer(config_name), rank=8)
    assert cls.__name__ in str(info.value)
    with pytest.raises(ValueError, match="conv_quant_config"):
        cls.from_float(fp_layer(config_name), if_LRMB=True)


def _conv_extra(cin: int, cout: int) -> dict[str, tuple[tuple[int, ...], float]]:
    return {"move0.bias": ((1, cin, 1, 1), 0.0), "relu.pr_bias0.bias": ((1, cout, 1, 1), 0.0),
            "relu.pr_prelu.weight": ((cout,), 0.25), "relu.pr_bias1.bias": ((1, cout, 1, 1), 0.0)}


# (config name, Cin, Cout) -> ordered extra keys with (shape, init value; None = random)
EXPECTED_EXTRA = {
    ("BinaryConv2d_XNOR", 4, 6): {}, ("BinaryLinear_XNOR", 4, 6): {},
    ("BinaryConv2d_HORQ", 4, 6): {}, ("BinaryLinear_HORQ", 4, 6): {},
    ("BinaryConv2d_ReSTE", 4, 6): {}, ("BinaryLinear_ReSTE", 4, 6): {},
    ("BinaryConv2d_reactnet", 4, 6): _conv_extra(4, 6), ("BinaryConv2d_BBCU", 4, 6): _conv_extra(4, 6),
    ("BinaryLinear_reactnet", 4, 6): {"channel_threshold": ((1, 4), 0.0)},
    ("BinaryLinear_BBCU", 4, 6): {"channel_threshold": ((1, 4), 0.0)},
    ("BinaryLinear_BiDM", 4, 6): {"channel_threshold": ((1, 4), 0.0)},
    ("BinaryConv2d_BiDM", 4, 4): {"channel_threshold": ((1, 4, 1, 1), 0.0),
                                  "shortcut_scale": ((1,), 0.3), "fliter_k.weight": ((1, 1, 3, 3), 1 / 9)},
    ("BinaryConv2d_BiDM", 4, 6): {"channel_threshold": ((1, 4, 1, 1), 0.0),
                                  "shortcut_scale": ((1,), 0.3), "fliter_k.weight": ((1, 1, 3, 3), 1 / 9),
                                  "shortcut.weight": ((6, 4, 1, 1), None), "shortcut.bias": ((6,), None)},
}


@pytest.mark.parametrize("config_name,cin,cout", sorted(EXPECTED_EXTRA))
def test_state_dict_keys_shapes_and_init(config_name, cin, cout):
    fp = fp_layer(config_name, cin=cin, cout=cout)
    sd = BASELINE_LAYERS[config_name](fp).state_dict()
    extra = EXPECTED_EXTRA[(config_name, cin, cout)]
    assert list(sd) == ["weight", "bias", *extra]
    assert sd["weight"].shape == fp.weight.shape and sd["bias"].shape == (cout,)
    for key, (shape, init) in extra.items():
        assert tuple(sd[key].shape) == shape, key
        if init is not None:
            assert torch.equal(sd[key], torch.full(shape, init)), key


def test_bidm_keeps_loaded_fliter_k_on_first_forward():
    layer = BiDMConv2d.from_float(nn.Conv2d(4, 4, 3, padding=1))
    sd = layer.state_dict()
    kernel = torch.rand(1, 1, 3, 3) * 0.2 + 0.05
    sd["fliter_k.weight"] = kernel
    layer.load_state_dict(sd)
    x = torch.randn(2, 4, 6, 6)
    y_loaded = layer(x)
    assert torch.equal(layer.fliter_k.weight, kernel)
    layer.reset_fliter_k()
    assert torch.equal(layer.fliter_k.weight, torch.full((1, 1, 3, 3), 1 / 9))
    assert not torch.allclose(layer(x), y_loaded)


def test_bidm_stride2_identity_shortcut_is_avg_pool():
    layer = BiDMConv2d.from_float(nn.Conv2d(4, 4, 3, stride=2, padding=1))
    assert layer.shortcut is None
    with torch.no_grad():
        layer.fliter_k.weight.zero_()  # K = 0 leaves only the shortcut
        layer.shortcut_scale.fill_(-0.5)  # used through abs()
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(layer(x), 0.5 * F.avg_pool2d(x, 2, 2))


@pytest.mark.parametrize("cls", [ReActNetConv2d, BBCUConv2d])
def test_rprelu_convs_drop_residual_on_stride2(cls):
    layer = cls.from_float(nn.Conv2d(4, 4, 3, stride=2, padding=1))
    assert layer(torch.randn(2, 4, 8, 8)).shape == (2, 4, 4, 4)


def test_reste_hyper_parameters_are_not_state():
    layer = ReSTEConv2d.from_float(nn.Conv2d(4, 4, 3, padding=1))
    assert list(layer.state_dict()) == ["weight", "bias"]
