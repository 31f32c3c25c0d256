"""BiMaCo denoiser <-> packed deploy file: export a model, rebuild one from a file.

The file holds the denoiser at 1 bit per binary weight (container: bimacosr/deploy/format.py).

Per binary layer ``<p>`` (the module name in the UNet):

========================  ====================================================================
``<p>.signs``             uint8 ``[Cout, ceil(Cin*k*k / 8)]``: sign bits (packing.py)
``<p>.sign_zeros``        int32 ``[z]``, only when some latent weight is exactly 0 (sign 0)
``<p>.alpha``             float32 ``[Cout]``: per-output-channel scale ``mean |W[o]|``
``<p>.bias``              ``[Cout]``
``<p>.rprelu.bias0``,     ``[Cout]`` each (convs only): RPReLU beta0, slope, beta1
``.slope``, ``.bias1``
``<p>.smb.indices``       int16 ``[2, n]`` (int32 when a side exceeds 32767): rounded (row, col)
``<p>.smb.values``        ``[n]``
``<p>.lora.first``,       ``[r, Cin]`` and ``[Cout, r]``: the LRMB as ``x -> second @ first @ x``
``<p>.lora.second``
========================  ====================================================================

Every other tensor of the model (GroupNorms, the two FP convs, relative-position tables) is
stored under its state_dict key. Not stored: latent weights, ``move0``, ``channel_threshold``, the
Downsample convs' unused SMB/LRMB (docs/quirks.md Q7), ``attn_mask`` and ``relative_position_index`` buffers
(recomputed at load). With ``fp16=True`` the side parts (bias, RPReLU, SMB values, LRMB, norms)
are stored as float16; alpha, FP convs and relative-position tables stay float32.

Metadata besides the format's own (bimacosr/deploy/format.py): ``params`` (the config's
``model.params`` as JSON), ``layers`` (JSON: prefix -> kind/in/out/kernel/stride/padding),
``side_dtype``. :func:`load_deploy` rebuilds the UNet skeleton on the meta device from ``params``
(no weight init, no SVD/top-k), swaps the deploy layers in and fills it.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor, nn

from bimacosr.config import to_plain
from bimacosr.deploy.format import DeployFileError, read_deploy_file, write_deploy_file
from bimacosr.deploy.layers import DeployBinaryConv2d, DeployBinaryLinear, _DeployBinary
from bimacosr.deploy.packing import pack_signs, packed_row_bytes, unpack_signs
from bimacosr.models.denoiser import RECOMPUTED_BUFFERS, denoiser_skeleton, recompute_buffers
from bimacosr.models.swin import SwinTransformerBlock, relative_position_index
from bimacosr.quant.bimaco import BiMaCoConv2d, BiMaCoLinear
from bimacosr.quant.common import QuantLayer

__all__ = ["ExportInfo", "fp_float32_bytes", "export_deploy", "load_deploy", "deploy_params"]

PathLike = Union[str, os.PathLike]  # noqa: UP007


def fp_float32_bytes(params: Mapping[str, Any]) -> int:
    """Bytes of the full-precision float32 denoiser of the same architecture as ``params`` (its
    parameters, as a checkpoint stores them; counted on the meta device): the reference for the
    size ratio. For the released config this is FP SinSR, 118,593,583 x 4 bytes (docs/denoiser.md §5)."""
    return 4 * sum(t.numel() for t in denoiser_skeleton(params, binarized=False).parameters())


@dataclass
class ExportInfo:
    """What :func:`export_deploy` wrote."""

    path: Path
    size_bytes: int
    binary_layers: int
    side_dtype: str
    fp_bytes: int
    """:func:`fp_float32_bytes` of the architecture."""

    @property
    def ratio(self) -> float:
        """``FP float32 bytes of the same architecture / file bytes``."""
        return self.fp_bytes / self.size_bytes

    def line(self) -> str:
        return (f"{self.path}: {self.size_bytes:,} bytes ({self.size_bytes / 1e6:.2f} MB), "
                f"{self.binary_layers} binary layers, side branches {self.side_dtype}; "
                f"the same architecture in FP float32 {self.fp_bytes / 1e6:.2f} MB / this = {self.ratio:.2f}x")


def _index_dtype(*sizes: int) -> torch.dtype:
    return torch.int16 if max(sizes) <= 32767 else torch.int32


def _pack_layer(layer: _DeployBinary, side: torch.dtype) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(spec, tensors)`` of one deploy layer, tensor names relative to its prefix."""
    conv = isinstance(layer, DeployBinaryConv2d)
    bits, zeros = pack_signs(layer.signs())
    out: dict[str, Tensor] = {"signs": bits, "alpha": layer.alpha.float()}
    if zeros.numel():
        out["sign_zeros"] = zeros.to(torch.int32 if layer.signs().numel() < 2**31 else torch.int64)
    if layer.bias is not None:
        out["bias"] = layer.bias.to(side)
    if conv:
        out.update({"rprelu.bias0": layer.rprelu_bias0.to(side),
                    "rprelu.slope": layer.rprelu_slope.to(side),
                    "rprelu.bias1": layer.rprelu_bias1.to(side)})
    if layer.smb_values is not None:
        out["smb.indices"] = layer.smb_indices.to(_index_dtype(layer.in_features, layer.out_features))
        out["smb.values"] = layer.smb_values.to(side)
    if layer.lora_first is not None:
        out["lora.first"] = layer.lora_first.to(side)
        out["lora.second"] = layer.lora_second.to(side)
    spec = {"kind": "conv" if conv else "linear", "in": layer.in_features, "out": layer.out_features}
    if conv:
        spec.update(kernel=layer.kernel_size, stride=layer.stride, padding=layer.padding)
    return spec, {k: v.detach().cpu().contiguous() for k, v in out.items()}


def _unpack_layer(spec: Mapping[str, Any], get, mode: str, side: str) -> _DeployBinary:
    """The deploy layer for ``spec``; ``get(name, shape, optional)`` returns a file tensor."""
    cin, cout = int(spec["in"]), int(spec["out"])
    k = int(spec.get("kernel", 1))
    shape = (cout, cin, k, k) if spec["kind"] == "conv" else (cout, cin)
    bits = get("signs", (cout, packed_row_bytes(shape)))
    signs = unpack_signs(bits, shape, get("sign_zeros", None, optional=True))
    alpha, bias = get("alpha", (cout,)), get("bias", (cout,), optional=True)
    smb = lora = None
    values = get("smb.values", None, optional=True)
    if values is not None:
        smb = (get("smb.indices", (2, values.numel())), values)
    first = get("lora.first", None, optional=True)
    if first is not None:
        if first.dim() != 2 or first.shape[1] != cin:
            raise ValueError(f"lora.first has shape {list(first.shape)}, expected [r, {cin}]")
        lora = (first, get("lora.second", (cout, first.shape[0])))
    if spec["kind"] == "linear":
        return DeployBinaryLinear(signs, alpha, bias, smb, lora, mode, side)
    rprelu = tuple(get(f"rprelu.{n}", (cout,)) for n in ("bias0", "slope", "bias1"))
    return DeployBinaryConv2d(signs, alpha, bias, rprelu, int(spec["stride"]), int(spec["padding"]),
                              smb, lora, mode, side)


def export_deploy(model: nn.Module, params: Mapping[str, Any], path: PathLike, *,
                  fp16: bool = False) -> ExportInfo:
    """Write the deploy file of a BiMaCo ``model`` (simulated or already deployed layers) built
    from ``params`` (the config's ``model.params``). Returns the size and ratio."""
    side = torch.float16 if fp16 else torch.float32
    tensors: dict[str, Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    prefixes = []
    norms = {f"{n}." for n, m in model.named_modules() if isinstance(m, nn.GroupNorm)}
    for name, module in model.named_modules():
        if isinstance(module, (BiMaCoConv2d, BiMaCoLinear)):
            module = (DeployBinaryConv2d if isinstance(module, BiMaCoConv2d)
                      else DeployBinaryLinear).from_simulated(module)
        elif isinstance(module, QuantLayer):
            raise ValueError(f"{name}: only BiMaCo layers can be deployed, found {type(module).__name__}")
        if not isinstance(module, _DeployBinary):
            continue
        layers[name], packed = _pack_layer(module, side)
        tensors.update({f"{name}.{k}": v for k, v in packed.items()})
        prefixes.append(f"{name}.")
    if not layers:
        raise ValueError("the model has no BiMaCo layers; export_deploy packs binarized denoisers")
    for key, value in model.state_dict().items():
        if key.startswith(tuple(prefixes)):
            continue
        if key.rsplit(".", 1)[-1] in RECOMPUTED_BUFFERS:
            continue
        dtype = side if key.startswith(tuple(norms)) else torch.float32
        if not value.is_floating_point():
            dtype = value.dtype
        tensors[key] = value.detach().to("cpu", dtype).contiguous()
    _check_recomputed(model)
    metadata = {"params": json.dumps(to_plain(params)), "layers": json.dumps(layers),
                "side_dtype": str(side).replace("torch.", "")}
    path = write_deploy_file(tensors, metadata, path)
    return ExportInfo(path, path.stat().st_size, len(layers), metadata["side_dtype"], fp_float32_bytes(params))


def _check_recomputed(model: nn.Module) -> None:
    """The buffers left out must be what the loader recomputes."""
    for name, block in model.named_modules():
        if isinstance(block, SwinTransformerBlock):
            index = block.attn.relative_position_index
            if not torch.equal(index.cpu(), relative_position_index(block.window)):
                raise ValueError(f"{name}.attn.relative_position_index differs from the standard "
                                 f"one; this model cannot be deployed as is")


def deploy_params(path: PathLike) -> dict[str, Any]:
    """The ``model.params`` a deploy file was exported from (checks the file first)."""
    metadata, _ = read_deploy_file(path)
    try:
        return json.loads(metadata["params"])
    except (KeyError, ValueError) as err:
        raise DeployFileError(f"{path}: no readable model.params in its metadata ({err})") from None


def load_deploy(path: PathLike, *, mode: str = "auto", side: str = "auto",
                device: torch.device | str = "cpu") -> nn.Module:
    """The deploy denoiser stored at ``path`` (eval mode, no gradients), on ``device``.

    ``mode``/``side`` are the deploy layers' execution modes (see layers.py). Raises
    ``DeployFileError`` naming the file for anything wrong with it.
    """
    metadata, tensors = read_deploy_file(path)
    try:
        params = json.loads(metadata["params"])
        layers = json.loads(metadata["layers"])
        model = _build(params, layers, tensors, mode, side)
    except DeployFileError as err:
        raise DeployFileError(f"{path}: {err}") from None
    except (KeyError, ValueError, TypeError, AttributeError) as err:
        raise DeployFileError(f"{path}: {type(err).__name__}: {err}") from None
    return model.to(device).eval().requires_grad_(False)


def _build(params: dict, layers: dict, tensors: dict[str, Tensor], mode: str,
           side: str) -> nn.Module:
    model = denoiser_skeleton(params, binarized=False)
    used: set[str] = set()

    def take(key: str, shape: tuple[int, ...] | None, optional: bool = False) -> Tensor | None:
        if key not in tensors:
            if optional:
                return None
            raise DeployFileError(f"missing tensor {key!r}")
        value = tensors[key]
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise DeployFileError(f"tensor {key!r} has shape {list(value.shape)}, expected {list(shape)}")
        used.add(key)
        return value.float() if value.is_floating_point() else value

    for prefix, spec in layers.items():
        old = model.get_submodule(prefix)
        _check_spec(prefix, spec, old)
        def get(name: str, shape, optional: bool = False, prefix: str = prefix) -> Tensor | None:
            return take(f"{prefix}.{name}", shape, optional)

        new = _unpack_layer(spec, get, mode, side)
        parent, _, child = prefix.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    for mod_name, module in model.named_modules():
        if isinstance(module, _DeployBinary):
            continue
        for store in (module._parameters, module._buffers):
            for name, value in list(store.items()):
                if value is None or not value.is_meta:
                    continue
                key = f"{mod_name}.{name}" if mod_name else name
                if name not in RECOMPUTED_BUFFERS:
                    loaded = take(key, tuple(value.shape)).to(value.dtype)
                    store[name] = nn.Parameter(loaded, requires_grad=False) if store is module._parameters else loaded
    recompute_buffers(model)
    extra = sorted(set(tensors) - used)
    if extra:
        raise DeployFileError(f"unexpected tensor(s) {extra[:5]}{' ...' if len(extra) > 5 else ''} "
                              f"(the structure built from the stored params does not use them)")
    return model


def _check_spec(prefix: str, spec: Mapping[str, Any], old: nn.Module) -> None:
    kind = spec.get("kind")
    if kind == "conv" and isinstance(old, nn.Conv2d):
        have = (old.in_channels, old.out_channels, old.kernel_size[0], old.stride[0], old.padding[0])
        want = tuple(int(spec[k]) for k in ("in", "out", "kernel", "stride", "padding"))
    elif kind == "linear" and isinstance(old, nn.Linear):
        have, want = (old.in_features, old.out_features), (int(spec["in"]), int(spec["out"]))
    else:
        raise DeployFileError(f"layer {prefix!r} is a {kind!r} binary layer in the file but a "
                              f"{type(old).__name__} in the model built from the stored params")
    if have != want:
        raise DeployFileError(f"layer {prefix!r}: file says {want}, the model built from the "
                              f"stored params has {have}")
