"""Parameter and operation counts of the denoisers and the VQ autoencoder, and the rules that turn
them into the "params" / "OPs" numbers of a paper table (docs/denoiser.md §5).

Counting is separate from pricing. :func:`count_params` sorts every parameter (and the SMB index
buffers) into a category; :func:`count_macs` runs one forward with hooks and sorts the
multiply-accumulates into categories. Both work on ``meta`` tensors (shapes only), which is how
:func:`count_denoiser` and :func:`count_autoencoder` build and run the full-size models. The rules
are pure functions of a :class:`Counts`:

* :func:`paper_rule` -- 1-bit parameters / 32 and 1-bit MACs / 64, restricted to the subset that
  reproduces the paper's 4.98 M (see its docstring for what it leaves out);
* :func:`complete_rule` -- every stored tensor at its stored bit width and every executed MAC.

MAC conventions: conv ``Cout * Cin/groups * k^2 * Hout * Wout``, linear ``in * out * tokens``,
window attention ``2 * N^2 * E`` per window (``q k^T`` and ``attn v`` over all heads; E = heads * d),
the SMB as ``nnz * positions`` (a sparse kernel; the reference code runs a dense ``Cout x Cin``
product, recorded as ``smb_dense``). Elementwise work (norms, activations, RPReLU, the binarization
scales, softmax, shortcuts) is not counted, as in the paper: at a 64x64 latent about 0.17 G tensor
elements pass through it in the BiMaCo UNet -- small next to the FP UNet's 50 G MACs, not next to
BiMaCo's 2.5 G.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from bimacosr.models.autoencoder import AttnBlock, VectorQuantizer, VQAutoencoder
from bimacosr.models.swin import WindowAttention
from bimacosr.quant.bimaco import LowRankBranch, SparseBranch
from bimacosr.quant.common import LearnableBias, QuantLayer, RPReLU

PARAM_CATEGORIES = ("binary_weight", "lrmb", "smb_values", "smb_indices", "binary_bias", "rprelu",
                    "move0", "channel_threshold", "groupnorm", "rel_tables", "fp_conv", "fp_linear",
                    "codebook")
"""Stored-tensor categories. ``smb_indices`` counts buffer entries (2 per SMB value); every other
category counts parameters. Other buffers (``relative_position_index``, ``attn_mask``) are
constants derived from the architecture and are not counted (``attn_mask`` is never even read)."""

MAC_CATEGORIES = ("binary", "fp_conv", "fp_linear", "lora_conv", "lora_linear", "smb", "smb_dense",
                  "attention", "codebook")
"""``binary``: the sign x sign product of binarized layers. ``smb`` is ``nnz * positions``;
``smb_dense`` is the same branch as the dense product the reference code executes (not used by
the rules). ``codebook``: the VQ nearest-code distances."""

UNUSED = ("move0", "channel_threshold")
"""Stored by BiMaCo layers but never read in their forward (docs/quirks.md Q10; the baselines do use them)."""
PAPER_DROPPED = ("smb_values", "smb_indices", "binary_bias", "rprelu", "move0", "channel_threshold",
                 "groupnorm")
"""What :func:`paper_rule` leaves out of a binarized model."""


@dataclass
class Counts:
    """Parameters and MACs of one network by category; ``alpha`` = output channels of the
    binarized layers (their per-channel weight scales, recomputed from the latent weights and
    not stored)."""

    params: dict[str, int] = field(default_factory=dict)
    macs: dict[str, int] = field(default_factory=dict)
    binary_layers: int = 0
    alpha: int = 0

    def param(self, *names: str) -> int:
        return sum(self.params.get(n, 0) for n in names)

    def mac(self, *names: str) -> int:
        return sum(self.macs.get(n, 0) for n in names)

    @property
    def total_params(self) -> int:
        """Every parameter (what ``sum(p.numel())`` gives; no buffers)."""
        return sum(v for k, v in self.params.items() if k != "smb_indices")


@dataclass(frozen=True)
class Cost:
    """A rule's result: FP32-equivalent parameters and FP-equivalent operations (MACs)."""

    params: float
    ops: float

    @property
    def megabytes(self) -> float:
        """Storage at 4 bytes per FP32-equivalent parameter, in MB (10^6 bytes)."""
        return self.params * 4 / 1e6


def _ancestors(modules: Mapping[str, nn.Module], owner: str) -> list[nn.Module]:
    parts = owner.split(".") if owner else []
    return [modules[".".join(parts[:i])] for i in range(len(parts) + 1)]


def _param_category(modules: Mapping[str, nn.Module], owner: str, leaf: str) -> str:
    chain = _ancestors(modules, owner)
    module = chain[-1]
    if any(isinstance(m, LowRankBranch) for m in chain):
        return "lrmb"
    if any(isinstance(m, RPReLU) for m in chain):
        return "rprelu"
    if isinstance(module, SparseBranch):
        return "smb_values"
    if isinstance(module, LearnableBias) and owner.rpartition(".")[2] == "move0":
        return "move0"
    if isinstance(module, QuantLayer):
        return {"weight": "binary_weight", "bias": "binary_bias"}.get(leaf, leaf)
    if isinstance(module, nn.GroupNorm):
        return "groupnorm"
    if leaf == "relative_position_bias_table":
        return "rel_tables"
    for kind, name in ((nn.Conv2d, "fp_conv"), (nn.Linear, "fp_linear"), (nn.Embedding, "codebook")):
        if isinstance(module, kind):
            return name
    raise ValueError(f"no parameter category for {owner}.{leaf} ({type(module).__name__})")


def count_params(model: nn.Module) -> Counts:
    """Parameters by :data:`PARAM_CATEGORIES`, SMB index entries, binarized layers and alpha."""
    modules = dict(model.named_modules())
    params: Counter[str] = Counter()
    for name, p in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        category = _param_category(modules, owner, leaf)
        if category not in PARAM_CATEGORIES:
            raise ValueError(f"unknown parameter {name}")
        params[category] += p.numel()
    for module in modules.values():
        if isinstance(module, SparseBranch):
            params["smb_indices"] += module.indices_float.numel()
    quant = [m for m in modules.values() if isinstance(m, QuantLayer)]
    return Counts(params=dict(params), binary_layers=len(quant), alpha=sum(m.weight.shape[0] for m in quant))


def count_macs(model: nn.Module, run: Callable[[], Any]) -> dict[str, int]:
    """MACs by :data:`MAC_CATEGORIES` of the modules of ``model`` while ``run()`` executes
    (e.g. one forward; no grad)."""
    lora = {id(m) for branch in model.modules() if isinstance(branch, LowRankBranch) for m in branch.modules()}
    macs: Counter[str] = Counter()

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Any) -> None:
        x = inputs[0]
        if isinstance(module, SparseBranch):
            positions = output.numel() // module.shape[0]
            macs["smb"] += module.values.numel() * positions
            macs["smb_dense"] += module.shape[0] * module.shape[1] * positions
        elif isinstance(module, WindowAttention):
            macs["attention"] += 2 * x.shape[0] * x.shape[1] ** 2 * x.shape[2]
        elif isinstance(module, AttnBlock):
            b, c, h, w = x.shape
            macs["attention"] += 2 * b * (h * w) ** 2 * c
        elif isinstance(module, VectorQuantizer):
            macs["codebook"] += x.numel() * module.embedding.weight.shape[0]
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            if isinstance(module, nn.Conv2d):
                per_position = module.weight[0].numel() * module.out_channels
                positions = output.numel() // module.out_channels
            else:
                per_position = module.weight.numel()
                positions = output.numel() // module.out_features
            kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
            category = "binary" if isinstance(module, QuantLayer) else f"lora_{kind}" if id(module) in lora else f"fp_{kind}"
            macs[category] += per_position * positions

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return dict(macs)


def count_denoiser(model: nn.Module, latent: int, batch: int = 1) -> Counts:
    """Counts of a denoiser (best built on the meta device: ``build_denoiser_from_config(cfg,
    role, meta=True)``) run at a ``latent x latent`` input on the meta device."""
    with torch.device("meta"):
        model = model.to("meta").eval()
        x = torch.zeros(batch, 3, latent, latent)
        counts = count_params(model)
        counts.macs = count_macs(model, lambda: model(x, torch.zeros(batch, dtype=torch.long), lq=x))
    return counts


def count_autoencoder(vq: VQAutoencoder, image: int, batch: int = 1) -> tuple[Counts, Counts]:
    """``(encoder, decoder)`` counts of the VQ autoencoder for an ``image x image`` picture, run
    on the meta device: encoder = ``encoder`` + ``quant_conv``; decoder = codebook lookup +
    ``post_quant_conv`` + ``decoder`` (``decode`` quantises)."""
    with torch.device("meta"):
        vq = vq.to("meta").eval()
        x = torch.zeros(batch, 3, image, image)
        encoder = count_params(nn.ModuleList([vq.encoder, vq.quant_conv]))
        encoder.macs = count_macs(vq, lambda: vq.encode(x))
        z = torch.zeros(batch, vq.quant_conv.out_channels, image // 4, image // 4)
        decoder = count_params(nn.ModuleList([vq.quantize, vq.post_quant_conv, vq.decoder]))
        decoder.macs = count_macs(vq, lambda: vq.decode(z))
    return encoder, decoder


def paper_rule(counts: Counts) -> Cost:
    """The rule that reproduces the paper's 118.59 M -> 4.98 M and comes closest to its OPs.

    Params: binary latent weights / 32 + everything else, except -- for a binarized model only --
    :data:`PAPER_DROPPED` (SMB values and indices, the biases of the binarized layers, RPReLU, the
    unused ``move0``/``channel_threshold``, GroupNorm). What remains for BiMaCo is LRMB + the two
    FP convs + the relative-position tables (4.980 M); for the FP model it is every parameter
    (GroupNorm and biases included), so the two sides are not counted the same way.
    OPs: binary MACs / 64 + FP conv and linear MACs (LoRA included), without the SMB and the
    window-attention matmuls. At a 64x64 latent this gives 50.12 G for the FP model (paper:
    50.23 G) and 1.77 G for BiMaCo (paper: 1.83 G, not reproduced: adding the SMB gives 1.93 G, and
    no sensible subset of the counted parts lands on 1.83 G).
    """
    dropped = PAPER_DROPPED if counts.binary_layers else ()
    params = counts.param("binary_weight") / 32 + sum(
        v for k, v in counts.params.items() if k not in dropped and k not in ("binary_weight", "smb_indices"))
    ops = counts.mac("binary") / 64 + counts.mac("fp_conv", "fp_linear", "lora_conv", "lora_linear")
    return Cost(params, ops)


def complete_rule(counts: Counts, index_bits: int = 32, include_unused: bool = True,
                  include_alpha: bool = True) -> Cost:
    """Everything a deployed file stores and a device executes.

    Params: binary latent weights at 1 bit (/32), SMB indices at ``index_bits`` (32: the stored
    float32 buffer; 16 suffices for every index here), every other parameter at 32 bit;
    ``include_unused`` keeps ``move0``/``channel_threshold`` (stored in the released state_dict,
    never read); ``include_alpha`` adds the per-channel scales, which a 1-bit file must store
    because the signs alone cannot give ``mean |W|``.
    OPs: binary MACs / 64 + every FP MAC: convs, linears, LoRA, SMB (nnz * positions), attention
    matmuls and the codebook search.
    """
    skip = {"binary_weight", "smb_indices", *(() if include_unused else UNUSED)}
    params = (counts.param("binary_weight") / 32 + counts.param("smb_indices") * index_bits / 32
              + sum(v for k, v in counts.params.items() if k not in skip)
              + (counts.alpha if include_alpha else 0))
    ops = counts.mac("binary") / 64 + counts.mac(*(c for c in MAC_CATEGORIES if c not in ("binary", "smb_dense")))
    return Cost(params, ops)
