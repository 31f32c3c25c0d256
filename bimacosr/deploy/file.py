"""The packed deploy file: one ``.safetensors`` holding a BiMaCo denoiser at 1 bit per weight.

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

Metadata: ``format`` (``bimacosr-deploy``), ``version``, ``params`` (the config's ``model.params``
as JSON), ``layers`` (JSON: prefix -> kind/in/out/kernel/stride/padding), ``side_dtype``,
``checksum`` (sha256 over names and bytes of every tensor). :func:`load_deploy` rebuilds the UNet
structure on the meta device from ``params`` (no weight init, no SVD/top-k) and fills it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from bimacosr.deploy.layers import DeployBinaryConv2d, DeployBinaryLinear, _DeployBinary
from bimacosr.deploy.packing import pack_signs, packed_row_bytes, unpack_signs
from bimacosr.models.denoiser import _use_quant_key_order, split_params
from bimacosr.models.swin import SwinTransformerBlock, relative_position_index, shift_window_mask
from bimacosr.models.unet import UNetModelSwin
from bimacosr.quant.bimaco import BiMaCoConv2d, BiMaCoLinear
from bimacosr.quant.common import QuantLayer

__all__ = ["DeployFileError", "ExportInfo", "FORMAT", "VERSION", "FP_SINSR_BYTES", "export_deploy",
           "export_checkpoint", "load_deploy", "read_deploy_file"]

PathLike = Union[str, os.PathLike]  # noqa: UP007
FORMAT = "bimacosr-deploy"
VERSION = 1
FP_SINSR_BYTES = 118_593_583 * 4
"""The FP SinSR denoiser in float32 (docs/denoiser.md §5), the reference for the size ratio."""
_RECOMPUTED = ("attn_mask", "relative_position_index")


class DeployFileError(Exception):
    """A deploy file that cannot be used; the message names the file and the problem."""


@dataclass
class ExportInfo:
    """What :func:`export_deploy` wrote."""

    path: Path
    size_bytes: int
    binary_layers: int
    side_dtype: str

    @property
    def ratio(self) -> float:
        """``FP SinSR float32 bytes / file bytes``."""
        return FP_SINSR_BYTES / self.size_bytes

    def line(self) -> str:
        return (f"{self.path}: {self.size_bytes:,} bytes ({self.size_bytes / 1e6:.2f} MB), "
                f"{self.binary_layers} binary layers, side branches {self.side_dtype}; "
                f"FP SinSR {FP_SINSR_BYTES / 1e6:.2f} MB / this = {self.ratio:.2f}x")


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


def _checksum(tensors: Mapping[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)};".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


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
        if key.rsplit(".", 1)[-1] in _RECOMPUTED:
            continue
        dtype = side if key.startswith(tuple(norms)) else torch.float32
        if not value.is_floating_point():
            dtype = value.dtype
        tensors[key] = value.detach().to("cpu", dtype).contiguous()
    _check_recomputed(model)
    metadata = {"format": FORMAT, "version": str(VERSION), "params": json.dumps(_jsonable(params)),
                "layers": json.dumps(layers), "side_dtype": str(side).replace("torch.", ""),
                "checksum": _checksum(tensors)}
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"deploy files are .safetensors; got {path}")
    _atomic_save(tensors, metadata, path)
    return ExportInfo(path, path.stat().st_size, len(layers), metadata["side_dtype"])


def export_checkpoint(ckpt: PathLike, config: PathLike, path: PathLike, *,
                      fp16: bool = False) -> ExportInfo:
    """Export a BiMaCo checkpoint (any layout ``read_state_dict`` accepts) trained with the
    YAML ``config`` (its ``model.params``) to the deploy file ``path``."""
    from bimacosr.checkpoint import load_state_dict_into, read_state_dict
    from bimacosr.config import load_config, to_plain
    from bimacosr.models import build_denoiser, is_binarized

    params = to_plain(load_config(config).model.params)
    if not is_binarized(params):
        raise ValueError(f"{config}: model.params has no binarization keys; only BiMaCo "
                         f"denoisers can be deployed (use e.g. configs/BiMaCoSR.yaml)")
    model = build_denoiser(params)
    load_state_dict_into(model, read_state_dict(ckpt, what="BiMaCo checkpoint"),
                         what="BiMaCo checkpoint")
    return export_deploy(model, params, path, fp16=fp16)


def _atomic_save(tensors: dict[str, Tensor], metadata: dict[str, str], path: Path) -> None:
    """Write to a temp file in the target folder, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, Exception):
            raise DeployFileError(f"could not write {path} ({type(err).__name__}: {err})") from err
        raise


def _jsonable(params: Mapping[str, Any]) -> dict[str, Any]:
    from bimacosr.models.denoiser import _plain
    return _plain(params)


def _check_recomputed(model: nn.Module) -> None:
    """The buffers left out must be what the loader recomputes."""
    for name, block in model.named_modules():
        if isinstance(block, SwinTransformerBlock):
            index = block.attn.relative_position_index
            if not torch.equal(index.cpu(), relative_position_index(block.window)):
                raise ValueError(f"{name}.attn.relative_position_index differs from the standard "
                                 f"one; this model cannot be deployed as is")


def read_deploy_file(path: PathLike) -> tuple[dict[str, str], dict[str, Tensor]]:
    """``(metadata, tensors)`` of a deploy file, checked for format, version and checksum."""
    path = Path(path)
    if not path.is_file():
        raise DeployFileError(f"deploy file not found: {path} (write one with scripts/export_deploy.py)")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as err:  # not safetensors, truncated, bad header
        reason = str(err).split("\n")[0][:160]
        raise DeployFileError(f"{path} is not a readable safetensors file ({type(err).__name__}: "
                              f"{reason}); it is corrupt, truncated or not a deploy file") from None
    if metadata.get("format") != FORMAT:
        raise DeployFileError(f"{path} is not a BiMaCoSR deploy file (format "
                              f"{metadata.get('format')!r}, expected {FORMAT!r}); a checkpoint is "
                              f"converted with scripts/export_deploy.py")
    if metadata.get("version") != str(VERSION):
        raise DeployFileError(f"{path} has deploy format version {metadata.get('version')!r}; this "
                              f"code reads version {VERSION} -- export it again with this code")
    if metadata.get("checksum") != _checksum(tensors):
        raise DeployFileError(f"{path}: checksum mismatch, the tensor data is corrupt")
    return metadata, tensors


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
    unet_kwargs, _ = split_params(params)
    with torch.device("meta"):
        model = UNetModelSwin(**unet_kwargs)
    _use_quant_key_order(model)
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
                if name in _RECOMPUTED:
                    store[name] = _recompute(module, name, value.shape)
                else:
                    loaded = take(key, tuple(value.shape)).to(value.dtype)
                    store[name] = nn.Parameter(loaded, requires_grad=False) if store is module._parameters else loaded
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


def _recompute(module: nn.Module, name: str, shape: torch.Size) -> Tensor:
    """``relative_position_index`` / ``attn_mask`` as the constructor computes them."""
    if name == "relative_position_index":
        return relative_position_index(math.isqrt(module.relative_position_bias_table.shape[0]) // 2 + 1)
    if not isinstance(module, SwinTransformerBlock):
        raise DeployFileError(f"unexpected buffer {name!r} in a {type(module).__name__}")
    resolution = module.window * math.isqrt(shape[0])
    return shift_window_mask(resolution, resolution, module.window, module.shift)
