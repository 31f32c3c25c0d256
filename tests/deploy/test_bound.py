"""The bound probe (``torch.ops.bimacosr.xor_popcount``, bound.cpp) against a popcount written in
PyTorch and against the fused kernel's dots, and the kernel on blocks of rows that mix pixels with
and without zeros (one micro-kernel call, masked, for the whole block)."""
import pytest
import torch
from torch import nn

from bimacosr import kernels
from bimacosr.deploy import DeployBinaryConv2d, DeployBinaryLinear, set_mode
from bimacosr.quant import BiMaCoConv2d, BiMaCoLinear

POWERS = torch.ones(64, dtype=torch.int64) << torch.arange(64)


def popcount(words: torch.Tensor) -> torch.Tensor:
    """Set bits per int64 word (any shape), in plain PyTorch."""
    return ((words.unsqueeze(-1) >> torch.arange(64)) & 1).sum(-1)


def pack_rows(flags: torch.Tensor) -> torch.Tensor:
    """Bool ``[M, C]`` -> int64 ``[M, ceil(C/64)]``, bit ``c % 64`` of word ``c // 64``, pad bits 0."""
    m, c = flags.shape
    words = -(-c // 64)
    padded = torch.zeros(m, words * 64, dtype=torch.int64)
    padded[:, :c] = flags.long()
    return (padded.view(m, words, 64) * POWERS).sum(-1)  # distinct powers of two: the sum is the OR


@pytest.mark.parametrize("rows,words,blocks", [(37, 5, 3), (9, 33, 1), (1, 1, 2)])
def test_bound_probe_counts_equal_a_plain_popcount(fused, rows, words, blocks):
    """Rows not a multiple of the blocking, more than 31 words (the AVX2 byte counters' flush),
    natural output order from the lanes' order."""
    gen = torch.Generator().manual_seed(rows)
    a = torch.randint(-2**63, 2**63 - 1, (rows, words), generator=gen)
    b = torch.randint(-2**63, 2**63 - 1, (blocks, words, kernels.LANES), generator=gen)
    got = torch.ops.bimacosr.xor_popcount(a, b)
    natural = torch.empty_like(b)
    natural[:, :, list(kernels.LANE_ORDER)] = b  # lane j holds output LANE_ORDER[j]
    want = popcount(a[:, None, None, :] ^ natural.permute(0, 2, 1)[None]).sum(-1).view(rows, -1)
    assert got.dtype == torch.int32
    assert torch.equal(got.long(), want)


@pytest.mark.parametrize("cin", [150, 192, 1280])
def test_bound_probe_and_kernel_give_the_same_popcounts(fused, cin):
    """±1 activations (s = 1) against ±1 weights, alpha 1, no shift: the kernel's output is its
    dot, ``Cin - 2 * popcount``, which the probe gives on the same bits."""
    gen = torch.Generator().manual_seed(cin)
    rows, cout = 45, 40
    x = torch.randint(0, 2, (rows, cin), generator=gen).float() * 2 - 1
    signs = (torch.randint(0, 2, (1, cin, cout), generator=gen) * 2 - 1).to(torch.int8)
    bits, mask = kernels.pack_weight_bits(signs)
    assert mask.numel() == 0
    ones = torch.ones(cout)
    y = kernels.binary_conv(x.view(1, 1, rows, cin), bits, mask, cout, ones, torch.zeros(cout), None, None, 1, 1, 0)
    differ = torch.ops.bimacosr.xor_popcount(pack_rows(x > 0), bits[0])[:, :cout]
    assert torch.equal(y.view(rows, cout), (cin - 2 * differ).float())


def _zeros_in_some_rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``x [..., C]`` with one exact zero in each listed row of its flattened ``[M, C]`` view."""
    flat = x.reshape(-1, x.shape[-1])
    for r in rows:
        flat[r, r % x.shape[-1]] = 0.0
    return flat.view(x.shape)


@pytest.mark.parametrize("make,shape,zero_rows", [
    (lambda: BiMaCoLinear.from_float(nn.Linear(192, 40)), (21, 192), [1, 5, 6, 12, 20]),
    (lambda: BiMaCoConv2d.from_float(nn.Conv2d(100, 24, 3, 1, 1)), (1, 5, 7, 100), [0, 9, 10, 33]),
])
def test_kernel_on_blocks_mixing_pixels_with_and_without_zeros(fused, make, shape, zero_rows):
    torch.manual_seed(len(zero_rows))
    sim = make()
    layer = set_mode((DeployBinaryLinear if isinstance(sim, BiMaCoLinear) else DeployBinaryConv2d)
                     .from_simulated(sim), "fused")
    x = _zeros_in_some_rows(torch.randn(shape), zero_rows)
    if x.dim() == 4:
        x = x.permute(0, 3, 1, 2)  # NHWC rows -> the layer's NCHW input
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), sim(x), atol=1e-4, rtol=0)


def test_kernel_rates_record_every_call_and_replay_it(fused, tiny_bimaco_denoiser):
    """What ``benchmark_unet.py --kernel-rates`` measures: every fused call of one step, by layer
    name, with the layer's own shape; a replay gives the layer's output again; the kernel entry
    point is restored afterwards."""
    import copy

    from bimacosr.deploy import to_deploy
    from bimacosr.deploy.rates import kernel_rates, record_calls

    deployed = set_mode(to_deploy(copy.deepcopy(tiny_bimaco_denoiser)), "fused")
    entry = kernels.binary_conv_op
    outputs: dict[str, torch.Tensor] = {}
    layers = {n: m for n, m in deployed.named_modules() if isinstance(m, (DeployBinaryConv2d, DeployBinaryLinear))}
    for name, layer in layers.items():
        layer.register_forward_hook(lambda m, a, out, name=name: outputs.setdefault(name, out.clone()))
    x, lq = torch.randn(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        calls = record_calls(deployed, lambda: deployed(x, torch.tensor([2]), lq=lq))
    assert kernels.binary_conv_op is entry
    assert calls and {c.name for c in calls} == set(outputs)  # every layer, and only through the kernel
    for call in calls:
        layer, s = layers[call.name], call.shape
        conv = isinstance(layer, DeployBinaryConv2d)
        assert (s["cin"], s["cout"], s["taps"]) == ((layer.in_channels, layer.out_channels, layer.kernel_size ** 2)
                                                    if conv else (layer.in_features, layer.out_features, 1))
        assert s["macs"] == s["pixels"] * s["cout"] * s["cin"] * s["taps"] > 0
    first = next(c for c in calls if c.args[8].numel() and c.name in outputs)  # with an LRMB (first_t)
    with torch.inference_mode():
        replayed = first.run()
    want = outputs[first.name]
    want = want.permute(0, 2, 3, 1) if want.dim() == 4 else want.reshape(replayed.shape)
    assert torch.equal(replayed.view(want.shape), want)  # the same call on this machine: bit for bit
    rows = kernel_rates(calls[:3], reps=1)
    assert [r["layer"] for r in rows] == [c.name for c in calls[:3]]
    assert all(r["kernel_s"] > 0 and r["bound_s"] > 0 for r in rows)

    # step_parts' replays without a side branch: the LRMB's share is x @ first_t @ second_t
    from bimacosr.deploy.rates import KINDS, PARTS, kind, step_parts, without_side

    call = next(c for c in calls if c.args[8].numel() and c.shape["taps"] == 1)
    x, first_t, second_t, cout = call.args[0], call.args[8], call.args[9], call.args[3]
    with torch.inference_mode():
        with_lowrank, binary = (kernels.binary_conv_op(*without_side(call.args, lowrank, False)) for lowrank in (True, False))
    lowrank = x.reshape(-1, x.shape[-1]).double() @ first_t.double() @ second_t[:, :cout].double()
    torch.testing.assert_close((with_lowrank - binary).reshape(lowrank.shape).double(), lowrank, atol=1e-5, rtol=1e-5)
    assert not torch.equal(with_lowrank, binary)
    parts = step_parts(calls[:3], rounds=1)
    assert list(parts) == list(PARTS) and all(list(by_kind) == list(KINDS) for by_kind in parts.values())
    present = {kind(c.shape) for c in calls[:3]}
    assert all((t > 0) == (k in present) for by_kind in parts.values() for k, t in by_kind.items())


@pytest.mark.slow
def test_kernel_ab_builds_a_copy_of_the_op_that_gives_the_same_outputs(fused, tiny_bimaco_denoiser, tmp_path):
    """scripts/kernel_ab.py: a build of the kernel's source under its own op namespace (hidden
    symbols, beside the package's library in one process) computes what the package's op does, on
    the recorded calls of a step; a git revision's sources are read as well as a folder's."""
    import copy
    import importlib.util

    from bimacosr.deploy import to_deploy
    from bimacosr.deploy.rates import record_calls
    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("kernel_ab", REPO / "scripts/kernel_ab.py")
    kernel_ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernel_ab)
    folder = REPO / "bimacosr/kernels"
    texts = kernel_ab.sources(str(folder))
    assert texts == {name: (folder / name).read_text() for name in kernel_ab.FILES}
    assert set(kernel_ab.sources("HEAD")) == set(kernel_ab.FILES) and "TORCH_LIBRARY(bimacosr," in texts["binary.cpp"]
    op = kernel_ab.build(texts, "test", tmp_path, [])
    deployed = set_mode(to_deploy(copy.deepcopy(tiny_bimaco_denoiser)), "fused")
    x, lq = torch.randn(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        calls = record_calls(deployed, lambda: deployed(x, torch.tensor([2]), lq=lq))
        assert calls and all(torch.equal(op(*c.args), c.run()) for c in calls)
    assert {kernel_ab.kind(c.shape) for c in calls} <= set(kernel_ab.KINDS)
