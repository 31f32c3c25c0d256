"""BiMaCo layers and the replace pass: fixtures, decomposition identity, quirks, errors."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bimacosr.config import load_config, to_plain
from bimacosr.parity import check_file
from bimacosr.models import build_denoiser
from bimacosr.quant import LAYERS, BiMaCoConv2d, BiMaCoLinear, binarize, convert_layer
from bimacosr.quant.bimaco import SparseBranch
from bimacosr.quant.binarize import binarize_activation, binarize_weight
from bimacosr.quant.common import QuantLayer
from tests.conftest import FIXTURES, REPO, compiled_run

RELEASED = to_plain(load_config(REPO / "configs/BiMaCoSR.yaml").model.params)


@pytest.mark.parametrize("name", ["bimaco_layer_grads.pt", "bimaco_init_decomposition.pt", "bimaco_init_residual.pt"])
def test_layer_and_init_fixtures(name):
    checks = check_file(FIXTURES / "denoiser" / name)
    assert len(checks) > 10 and all(c.passed for c in checks), [c.line() for c in checks if not c.passed]


def test_conv_branches_add_up_to_the_fp_conv():
    torch.manual_seed(0)
    fp = nn.Conv2d(24, 40, 3, padding=1)
    layer = convert_layer("BinaryConv2d_ours_with_skip_and_lora", fp, rank=8, if_LRMB=True, if_SMB=True)
    x = torch.randn(2, 24, 7, 9)
    first, second = layer.lora.factors()
    parts = (F.conv2d(x, layer.weight, layer.bias, padding=1) + layer.skip_connection(x, channel_dim=1)
             + F.conv2d(x, (second @ first)[:, :, None, None]))
    torch.testing.assert_close(parts, fp(x), atol=1e-5, rtol=0)
    assert layer.bias is fp.bias
    assert int((layer.skip_connection.dense() != 0).sum()) == 2 * 40  # Q17: n = 2 max(Cin, Cout)


def test_linear_branches_add_up_to_the_fp_linear():
    torch.manual_seed(1)
    fp = nn.Linear(48, 20)
    layer = BiMaCoLinear.from_float(fp, rank=4)
    x = torch.randn(3, 5, 48)
    first, second = layer.lora.factors()
    parts = F.linear(x, layer.weight + second @ first + layer.skip_connection.dense(), layer.bias)
    torch.testing.assert_close(parts, fp(x), atol=1e-5, rtol=0)
    assert first.shape == (4, 48) and [n for n, _ in layer.lora.named_children()] == ["B", "A"]  # Q15


def test_rank_is_clamped_to_the_smaller_side():
    layer = BiMaCoConv2d.from_float(nn.Conv2d(4, 16, 1), rank=8)
    assert layer.lora.A.weight.shape == (4, 4, 1, 1) and layer.lora.B.weight.shape == (16, 4, 1, 1)


def test_sign_of_zero_is_zero_and_scales_are_per_pixel_and_per_channel():
    x = torch.tensor([[[[0.0, 2.0]], [[-1.0, 2.0]]]])  # [1, 2, 1, 2]
    xb = binarize_activation(x, dim=1)
    assert torch.equal(xb, torch.tensor([[[[0.0, 2.0]], [[-0.5, 2.0]]]]))
    w = torch.tensor([[0.5, -1.5], [0.0, 2.0]])
    assert torch.allclose(binarize_weight(w), torch.tensor([[1.0, -1.0], [0.0, 1.0]]), atol=1e-7)


def test_sparse_indices_are_rounded_not_truncated():
    sparse = SparseBranch(2, 3, nnz=3)
    with torch.no_grad():
        sparse.indices_float.copy_(torch.tensor([[0.6, 0.2, 1.4], [1.7, 0.49, 2.5]]))
        sparse.values.copy_(torch.tensor([1.0, 2.0, 3.0]))
    dense = sparse.dense()
    # (0.6, 1.7) -> (1, 2); (0.2, 0.49) -> (0, 0); (1.4, 2.5) -> (1, 2) (round half to even): summed
    assert torch.equal(dense, torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 4.0]]))


def test_downsample_conv_uses_avg_pool_shortcut_and_skips_branches():
    torch.manual_seed(2)
    layer = BiMaCoConv2d.from_float(nn.Conv2d(8, 8, 3, stride=2, padding=1))
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        before = layer(x)
        layer.skip_connection.values.add_(1.0)
        layer.lora.A.weight.add_(1.0)
        assert torch.equal(layer(x), before)  # Q7: SMB and LRMB unused at stride 2


def test_full_model_replaces_178_layers_and_keeps_first_and_last_conv():
    with torch.device("meta"):
        model = build_denoiser(RELEASED)
    binary = [n for n, m in model.named_modules() if isinstance(m, QuantLayer)]
    kept = [n for n, m in model.named_modules() if type(m) is nn.Conv2d and ".lora." not in n]
    assert len(binary) == 178 and kept == ["input_blocks.0.0", "out.2"]


def test_binarize_converts_in_place_from_current_weights():
    torch.manual_seed(3)
    tiny = dict(image_size=16, in_channels=6, model_channels=32, out_channels=3, attention_resolutions=[],
                channel_mult=[1], num_res_blocks=1, num_head_channels=16, swin_embed_dim=32,
                use_scale_shift_norm=True)
    model = build_denoiser(tiny)
    fp_weight = model.input_blocks[1][0].in_layers[2].weight.detach().clone()
    quant = {k: RELEASED[k] for k in ("binary_linear", "conv_quant_modules", "linear_quant_modules",
                                      "conv_quant_config", "linear_quant_config", "which_fp_conv")}
    assert binarize(model, quant) is model
    conv = model.input_blocks[1][0].in_layers[2]
    assert isinstance(conv, BiMaCoConv2d)
    first, second = conv.lora.factors()
    rebuilt = conv.weight.detach().clone()
    rebuilt[:, :, 1, 1] += conv.skip_connection.dense().detach() + (second @ first).detach()
    torch.testing.assert_close(rebuilt, fp_weight, atol=1e-6, rtol=0)
    assert binarize(model, quant) is model  # a second pass converts nothing twice
    assert isinstance(model.input_blocks[1][0].in_layers[2], BiMaCoConv2d)


def test_unknown_layer_name_is_an_error_not_an_fp_model():
    with pytest.raises(ValueError, match="unknown binary layer 'BinaryConv2d_our'.*BinaryConv2d_XNOR"):
        binarize(nn.Sequential(nn.Conv2d(3, 3, 3)), {"conv_quant_modules": "BinaryConv2d_our"})
    with pytest.raises(ValueError, match="unknown binary layer"):
        convert_layer("nope", nn.Conv2d(3, 3, 1))
    with pytest.raises(TypeError, match="replaces nn.Linear"):
        convert_layer("BinaryLinear_ours_with_skip_and_lora", nn.Conv2d(3, 3, 1))


def test_bad_layer_options_are_errors():
    with pytest.raises(TypeError):
        convert_layer("BinaryConv2d_ours_with_skip_and_lora", nn.Conv2d(4, 4, 3), rnk=8)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        convert_layer("BinaryConv2d_ours_with_skip_and_lora", nn.Conv2d(4, 4, 3), rank=0)
    with pytest.raises(ValueError, match=r"\{\}"):
        binarize(nn.Sequential(nn.Conv2d(3, 3, 3)), {"conv_quant_modules": "BinaryConv2d_XNOR",
                                                       "conv_quant_config": {"rank": 8}, "which_fp_conv": []})


@pytest.mark.parametrize("name", sorted(n for n in LAYERS if n.startswith("BinaryConv2d")))
def test_every_conv_name_builds_and_runs(name):
    config = {"rank": 2} if "ours" in name else {}
    layer = convert_layer(name, nn.Conv2d(4, 8, 3, padding=1), **config)
    assert isinstance(layer, QuantLayer) and layer(torch.randn(1, 4, 5, 5)).shape == (1, 8, 5, 5)


def test_eval_inference_binarizes_once_and_notices_weight_changes():
    torch.manual_seed(4)
    layer = BiMaCoConv2d.from_float(nn.Conv2d(8, 8, 3, padding=1)).eval()
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        first = layer(x)
        cached = layer._eval_cache["binary_weight"][1]
        assert torch.equal(layer(x), first) and layer._eval_cache["binary_weight"][1] is cached
        layer.skip_connection.values.mul_(3.0)  # in-place edits (optimizer, load_state_dict) invalidate
        layer.weight.neg_()
        after = layer(x)
    torch.testing.assert_close(layer.binary_weight(), -cached, atol=1e-6, rtol=0)
    assert not torch.equal(after, first)
    layer.train()
    layer(x).sum().backward()  # training never uses the cache: gradients flow
    assert layer.weight.grad is not None and layer.skip_connection.values.grad is not None


def test_a_compiled_model_binarizes_in_its_graph_without_recompiles():
    """Under ``torch.compile`` (``--compile``) the eval-mode cache of binarized weights steps aside
    (``eval_cached``): dynamo traces the binarization into the graph instead of recompiling each
    layer on the cache's storage and version checks and giving up past its recompile limit."""
    torch.manual_seed(0)
    layers = nn.Sequential(*[BiMaCoLinear.from_float(nn.Linear(16 + i, 17 + i)) for i in range(10)]).eval()
    x = torch.randn(4, 16)
    out, recompiles = compiled_run(layers, x)
    with torch.inference_mode():
        assert torch.equal(out, layers(x))
    assert not recompiles
