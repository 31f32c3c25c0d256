"""Deploy versions of the BiMaCo layers: binary weights as signs, exact binary products.

``DeployBinaryConv2d`` / ``DeployBinaryLinear`` compute what ``BiMaCoConv2d`` / ``BiMaCoLinear``
(bimacosr/quant/bimaco.py, docs/denoiser.md §4) compute, with the weight binarized once, at
construction: ``sign(W)`` is kept as int8 and ``alpha[o] = mean |W[o]|`` as float32.

For a linear (and a 1x1 conv) the per-token / per-pixel scale ``s`` factors out of the sum; for a
``k x k`` conv it does not (``s`` is per *input* pixel), so the conv is a sum over taps::

    y[m, o] = alpha[o] * sum_t s_t[m] * (X_t[m, :] @ sign(W)[o, :, t])     (t = the k*k taps)

with ``X_t`` the zero-padded, stride-subsampled sign map (``sign(0) = 0``) shifted to tap ``t``,
laid out as ``[B*Ho*Wo, Cin]`` (channels last). Execution modes of the binary branch:

* ``"fused"``: the C++ kernel of ``bimacosr.kernels`` (docs/kernel.md) -- one pass signs,
  bit-packs and scales the NHWC input, an XOR-popcount GEMM sums the taps, and alpha, bias and
  RPReLU are applied in its epilogue. CPU only; compiled on first use.
* ``"int"`` (the stock PyTorch path): int8 sign maps times the int8 signs by ``torch._int_mm``
  per tap, products of ±1 summed in int32, exact.
* ``"float"``: a float convolution / matmul of ``s*sign(x)`` with the ±1 weight (for devices
  without an int8 GEMM).
* ``"auto"`` (default): ``"fused"`` on CPU when the kernel builds (else ``"int"``, with a
  one-line notice), ``"int"`` elsewhere. ``BIMACOSR_KERNEL=off`` keeps ``"auto"`` off the kernel.

All equal the simulated layer up to float summation order (about 1e-6 relative).

Side branches act on the real-valued input, as 1x1 products on the channels-last matrix:
``side="sparse"`` (default on CPU) adds the LRMB as two thin products and the SMB as a sparse one
-- both in the kernel's epilogue on the fused path, a thin ``addmm`` and a CSR matrix
otherwise; ``side="dense"`` (default on CUDA) merges both into one dense matrix. The branch rules (avg-pool / nearest shortcut when
``Cin == Cout`` and the height changes, LRMB only at equal heights, RPReLU on the binary branch
only) are the simulated layer's. Every layer computes in float32 with autocast disabled (inputs
of any float dtype, also under ``torch.autocast``) and returns the input's dtype.

Under ``torch.compile`` (``--compile``) the layers run eagerly (``torch.compiler.disable``): their
cached plans and the fused op are opaque to dynamo, which compiled each layer's forward anew and
gave up past its recompile limit with a warning (docs/speed.md §1).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bimacosr import kernels
from bimacosr.models.layers import autocast_off
from bimacosr.quant.bimaco import BiMaCoConv2d, BiMaCoLinear

__all__ = ["DeployBinaryConv2d", "DeployBinaryLinear", "int_matmul", "to_deploy", "set_mode",
           "side_dropped"]

MODES = ("auto", "fused", "int", "float")
SIDES = ("auto", "sparse", "dense")


def int_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a [M, K] @ b [K, N]`` for int8 values in ``{-1, 0, 1}``: the exact integer result.

    ``torch._int_mm`` (int32 out) on CPU; on CUDA too when ``K`` and ``N`` are multiples of 8
    (rows are zero-padded to 32 when ``M <= 16``). Elsewhere, or if the kernel refuses, a float32
    matmul of the same values (float32 out), which is exact as well for ``K < 2**24``.
    """
    if a.device.type == "cpu":
        return torch._int_mm(a, b)
    m, k = a.shape
    if a.device.type == "cuda" and k % 8 == 0 and b.shape[1] % 8 == 0:
        padded = F.pad(a, (0, 0, 0, 32 - m)) if m <= 16 else a
        try:
            return torch._int_mm(padded, b)[:m]
        except RuntimeError:
            pass
    return a.float() @ b.float()


def _check_mode(mode: str, side: str) -> None:
    if mode not in MODES:
        raise ValueError(f"deploy mode must be one of {MODES}, got {mode!r}")
    if side not in SIDES:
        raise ValueError(f"deploy side mode must be one of {SIDES}, got {side!r}")


def side_dropped(in_channels: int, out_channels: int, stride: int) -> bool:
    """True for the Downsample convs (``Cin == Cout``, stride > 1): their SMB/LRMB are never
    used (docs/quirks.md Q7, the avg-pool shortcut replaces them) and are not deployed. Only a 1-pixel-high
    input would reach them in the simulated layer; the deploy layer raises there instead."""
    return in_channels == out_channels and stride > 1


class _DeployBinary(nn.Module):
    """Shared state: ±1 signs (int8), alpha, bias, SMB (indices + values), LRMB factors, modes.

    Runtime forms derived from the buffers (float ±1 weight, CSR matrix, merged dense side) are
    built on first use per device and cached; moving the module clears the cache.
    """

    in_features: int
    out_features: int

    def _init_common(self, alpha: Tensor, bias: Tensor | None, smb: tuple[Tensor, Tensor] | None,
                     lora: tuple[Tensor, Tensor] | None, mode: str, side: str) -> None:
        _check_mode(mode, side)
        cout, cin = self.out_features, self.in_features
        self.mode, self.side = mode, side
        self._cache: dict[tuple, Tensor] = {}
        self.register_buffer("alpha", _vector(alpha, cout, "alpha"))
        self.register_buffer("bias", None if bias is None else _vector(bias, cout, "bias"))
        if smb is not None:
            indices, values = smb
            indices = indices.detach().round().long().reshape(2, -1)
            if indices.numel() and (int(indices.min()) < 0 or int(indices[0].max()) >= cout
                                    or int(indices[1].max()) >= cin):
                raise ValueError(f"SMB indices out of range for a {cout}x{cin} matrix")
            values = values.detach().float().reshape(-1)
            if values.numel() != indices.shape[1]:
                raise ValueError(f"SMB has {indices.shape[1]} index pairs but {values.numel()} values")
            self.register_buffer("smb_indices", indices)
            self.register_buffer("smb_values", values)
        else:
            self.smb_indices = self.smb_values = None
        if lora is not None:
            first, second = (t.detach().float() for t in lora)
            rank = first.shape[0]
            if first.shape != (rank, cin) or second.shape != (cout, rank):
                raise ValueError(f"LRMB factors must be [r, {cin}] and [{cout}, r], got "
                                 f"{list(first.shape)} and {list(second.shape)}")
            self.register_buffer("lora_first", first.contiguous())
            self.register_buffer("lora_second", second.contiguous())
        else:
            self.lora_first = self.lora_second = None

    # -- runtime caches ---------------------------------------------------------------------
    def _cached(self, key: tuple, make: Callable[[], Any]) -> Any:
        key = key + (self.alpha.device,)
        if key not in self._cache:
            with torch.no_grad():
                self._cache[key] = make()
        return self._cache[key]

    def _apply(self, fn, recurse=True):
        """Clear the caches and keep float buffers in float32 (``.half()`` leaves this layer
        computing in float32; inputs are cast)."""
        self._cache = {}
        super()._apply(fn, recurse)
        for name, buf in self._buffers.items():
            if buf is not None and buf.is_floating_point() and buf.dtype != torch.float32:
                self._buffers[name] = buf.float()
        return self

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        """Loading new values clears the caches made from the old ones (packed signs, side branch
        forms, plans): a used layer would otherwise mix them with the new buffers."""
        self._cache = {}
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict:
        """Copies and pickles leave the runtime cache behind (CSR tensors cannot be deep-copied)."""
        state = self.__dict__.copy()
        state["_cache"] = {}
        return state

    def smb_dense(self) -> Tensor | None:
        """The SMB as a dense ``[Cout, Cin]`` matrix (duplicate positions add up), or None."""
        if self.smb_values is None:
            return None
        dense = self.smb_values.new_zeros(self.out_features, self.in_features)
        return dense.index_put(tuple(self.smb_indices), self.smb_values, accumulate=True)

    def _side_mode(self) -> str:
        if self.side != "auto":
            return self.side
        return "dense" if self.alpha.device.type == "cuda" else "sparse"

    def _path(self) -> str:
        """The binary branch's execution: ``fused``, ``int`` or ``float`` (see the module doc)."""
        if self.mode == "fused":
            kernels.require()
            return "fused"
        if self.mode == "auto":
            return "fused" if self.alpha.device.type == "cpu" and kernels.available() else "int"
        return self.mode

    def _side_in_kernel(self) -> bool:
        """Whether the side branches go into the fused kernel's epilogue (fused path, sparse side)."""
        return self._path() == "fused" and self._side_mode() == "sparse"

    def _kernel_io(self, x: Tensor) -> bool:
        """Whether a bf16 ``x`` goes to the fused kernel as is: it then reads bf16 and writes
        bf16 rounded as ``.to(torch.bfloat16)`` would, the same values as converting around a
        float32 call (except the low-rank branch in bf16 pairs with AVX512-BF16: docs/kernel.md
        §4), without the two conversion passes. Needs the side branches in the kernel."""
        return x.dtype == torch.bfloat16 and self._side_in_kernel()

    def _plan(self, x: Tensor, h: int) -> tuple | None:
        """The fused op's arguments after its input (``kernels.op_arguments(...)[1:]``) for an input
        like ``x`` (``h`` pixels high; 0 for a linear) that the kernel reads as it is: float32, or bf16
        with the side branches in the kernel. None where the call takes another route (another path,
        dense side branches, the shortcut, another dtype). Made once per mode, side, dtype and
        height, so such a call skips the autocast context, conversions and checks (~30 µs of Python
        each, 178 calls a UNet step)."""
        return self._cached(("plan", self.mode, self.side, x.dtype, h), lambda: self._make_plan(x.dtype, h))

    def _make_plan(self, dtype: torch.dtype, h: int) -> tuple | None:
        raise NotImplementedError

    def _weight_bits(self, taps: Tensor) -> tuple[Tensor, Tensor]:
        """The fused kernel's packed signs of ``taps [T, Cin, Cout]`` (cached)."""
        return self._cached(("bits",), lambda: kernels.pack_weight_bits(taps))

    def _kernel_side(self, use_lora: bool) -> tuple[tuple | None, tuple | None]:
        """The side branches in the fused kernel's forms (cached), ``(lowrank, sparse)``: None
        each where absent (or not asked for)."""
        lowrank = sparse = None
        if use_lora and self.lora_first is not None:
            lowrank = self._cached(("lowrank",), lambda: kernels.pack_lowrank(self.lora_first, self.lora_second))
        if self.smb_values is not None:
            sparse = self._cached(("sparse",), lambda: kernels.pack_sparse(
                self.smb_indices, self.smb_values, self.out_features))
        return lowrank, sparse

    def _add_side(self, y: Tensor, xm: Tensor, use_smb: bool, use_lora: bool) -> Tensor:
        """``y [M, Cout] += xm [M, Cin] @ (S + L)^T`` with the branches asked for (in place)."""
        use_smb = use_smb and self.smb_values is not None
        use_lora = use_lora and self.lora_first is not None
        if not (use_smb or use_lora):
            return y
        if self._side_mode() == "dense":
            def merged() -> Tensor:
                total = self.smb_dense() if use_smb else 0.0
                if use_lora:
                    total = total + self.lora_second @ self.lora_first
                return total.t().contiguous()
            return y.addmm_(xm, self._cached(("dense", use_smb, use_lora), merged))
        if use_lora:
            y.addmm_(xm @ self.lora_first.t(), self.lora_second.t())
        if use_smb:
            def csr() -> Tensor:
                with warnings.catch_warnings():  # "sparse CSR support is in beta state"
                    warnings.simplefilter("ignore")
                    return self.smb_dense().t().contiguous().to_sparse_csr()
            y.addmm_(xm, self._cached(("csr",), csr))
        return y

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, mode={self.mode}, side={self.side}, "
                f"smb={self.smb_values is not None}, lora={self.lora_first is not None}")


def _vector(t: Tensor, n: int, name: str) -> Tensor:
    t = t.detach().float().reshape(-1)
    if t.numel() != n:
        raise ValueError(f"{name} must have {n} entries, got {t.numel()}")
    return t.contiguous()


def _side_of(layer: BiMaCoConv2d | BiMaCoLinear) -> tuple[tuple[Tensor, Tensor] | None, tuple[Tensor, Tensor] | None]:
    """A simulated layer's ``(SMB indices, values)`` and ``(LRMB first, second)``, or None each."""
    smb = None
    if layer.skip_connection is not None:
        smb = (layer.skip_connection.indices_float, layer.skip_connection.values)
    return smb, layer.lora.factors() if layer.lora is not None else None


def _alpha_of(weight: Tensor) -> Tensor:
    """``mean |W|`` over all but the first axis, as ``binarize_weight`` computes it."""
    return weight.detach().abs().mean(dim=tuple(range(1, weight.dim())), keepdim=True).reshape(-1)


class DeployBinaryConv2d(_DeployBinary):
    """``[B, Cin, H, W] -> [B, Cout, Ho, Wo]`` (channels-last memory), = ``BiMaCoConv2d``.

    ``signs`` int8 ``[Cout, Cin, k, k]`` in ``{-1, 0, 1}``; ``alpha`` / ``bias`` ``[Cout]``;
    ``rprelu`` = ``(beta0, slope, beta1)``, each ``[Cout]``; ``smb`` = ``(indices [2, n]``
    (row = output, col = input; rounded), ``values [n])``; ``lora`` = ``(first [r, Cin],
    second [Cout, r])``. Stored as ``taps`` int8 ``[k*k, Cin, Cout]`` (one GEMM operand per tap).
    """

    def __init__(self, signs: Tensor, alpha: Tensor, bias: Tensor | None,
                 rprelu: tuple[Tensor, Tensor, Tensor], stride: int = 1, padding: int = 0,
                 smb: tuple[Tensor, Tensor] | None = None, lora: tuple[Tensor, Tensor] | None = None,
                 mode: str = "auto", side: str = "auto"):
        super().__init__()
        if signs.dim() != 4 or signs.shape[2] != signs.shape[3]:
            raise ValueError(f"conv signs must be [Cout, Cin, k, k], got {list(signs.shape)}")
        self.out_channels, self.in_channels, self.kernel_size = (int(s) for s in signs.shape[:3])
        self.out_features, self.in_features = self.out_channels, self.in_channels
        self.stride, self.padding = int(stride), int(padding)
        self.side_dropped = side_dropped(self.in_channels, self.out_channels, self.stride)
        if self.side_dropped:
            smb = lora = None
        self._init_common(alpha, bias, smb, lora, mode, side)
        taps = signs.detach().to(torch.int8).flatten(2).permute(2, 1, 0)  # [k*k, Cin, Cout]
        self.register_buffer("taps", taps.contiguous())
        beta0, slope, beta1 = (_vector(t, self.out_channels, "RPReLU") for t in rprelu)
        self.register_buffer("rprelu_bias0", beta0)
        self.register_buffer("rprelu_slope", slope)
        self.register_buffer("rprelu_bias1", beta1)

    @classmethod
    def from_simulated(cls, layer: BiMaCoConv2d, mode: str = "auto",
                       side: str = "auto") -> "DeployBinaryConv2d":
        """Binarize ``layer``'s latent weight once and copy its branches (move0 is dropped)."""
        smb, lora = _side_of(layer)
        relu = layer.relu
        rprelu = (relu.pr_bias0.bias, relu.pr_prelu.weight, relu.pr_bias1.bias)
        return cls(torch.sign(layer.weight.detach()).to(torch.int8), _alpha_of(layer.weight),
                   layer.bias, rprelu, layer.stride[0], layer.padding[0], smb, lora, mode, side)

    def signs(self) -> Tensor:
        """The int8 signs ``[Cout, Cin, k, k]``."""
        k = self.kernel_size
        return self.taps.permute(2, 1, 0).reshape(self.out_channels, self.in_channels, k, k)

    @torch.compiler.disable  # see the module docstring
    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__} expects [B, {self.in_channels}, H, W], got "
                             f"{list(x.shape)}")
        plan = self._plan(x, x.shape[2])
        if plan is not None:  # NHWC view of a channels-last input, as _forward passes it
            return kernels.binary_conv_op(x.permute(0, 2, 3, 1).contiguous(), *plan).permute(0, 3, 1, 2)
        with autocast_off(x.device.type):  # computes in float32, returns x.dtype
            if self._kernel_io(x) and not self._shortcut(x.shape[2]):  # shortcut adds in torch
                return self._forward(x)  # the kernel reads and writes bf16 itself
            return self._forward(x.float()).to(x.dtype)

    def _make_plan(self, dtype: torch.dtype, h: int) -> tuple | None:
        if dtype not in (torch.float32, torch.bfloat16) or not self._side_in_kernel() or self._shortcut(h) \
                or self.side_dropped:  # (side_dropped without the shortcut: _forward raises)
            return None
        k, st, p = self.kernel_size, self.stride, self.padding
        bits, mask = self._weight_bits(self.taps)
        lowrank, sparse = self._kernel_side(use_lora=h == (h + 2 * p - k) // st + 1)
        return kernels.op_arguments(None, bits, mask, self.out_channels, self.alpha, self._shift(), self.rprelu_slope,
                                    self.rprelu_bias1, k, st, p, lowrank, sparse)[1:]

    def _shift(self) -> Tensor:
        """The epilogue's shift before RPReLU: bias + beta0, added once (cached)."""
        return self._cached(("shift",), lambda: self.rprelu_bias0 if self.bias is None else self.bias + self.rprelu_bias0)

    def _shortcut(self, h: int) -> bool:
        """Whether an input ``h`` pixels high takes the avg-pool / nearest shortcut (``Cin ==
        Cout`` and the height changes) instead of the side branches."""
        ho = (h + 2 * self.padding - self.kernel_size) // self.stride + 1
        return self.in_channels == self.out_channels and h != ho

    def _forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        k, st, p = self.kernel_size, self.stride, self.padding
        ho, wo = (h + 2 * p - k) // st + 1, (w + 2 * p - k) // st + 1
        xh = x.permute(0, 2, 3, 1).contiguous()  # NHWC; free for a channels-last input
        xm = xh.view(-1, self.in_channels)  # [B*H*W, Cin]
        path = self._path()
        shortcut = self._shortcut(h)
        if self.side_dropped and not shortcut:
            raise RuntimeError(f"{type(self).__name__} ({self.in_channels} channels, stride {st}) "
                               f"got a {h}-pixel-high input whose output is as high: the simulated "
                               f"layer would use its SMB/LRMB there, which were not deployed (docs/quirks.md Q7)")
        fuse_side = self._side_in_kernel() and not shortcut
        if path == "fused":
            bits, mask = self._weight_bits(self.taps)
            lowrank, sparse = self._kernel_side(use_lora=h == ho) if fuse_side else (None, None)
            y = kernels.binary_conv(xh, bits, mask, self.out_channels, self.alpha, self._shift(),
                                    self.rprelu_slope, self.rprelu_bias1, k, st, p, lowrank,
                                    sparse).view(-1, self.out_channels)
        else:
            scale = xm.abs().mean(dim=1).view(b, h, w)  # s, per pixel
            y = self._binary_int(xm, scale, b, h, w, ho, wo) if path == "int" else \
                self._binary_float(x, scale)
            y.mul_(self.alpha).add_(self._shift())  # [B*Ho*Wo, Cout]
            y = F.prelu(y, self.rprelu_slope).add_(self.rprelu_bias1)
        if shortcut:
            out = y.view(b, ho, wo, -1).permute(0, 3, 1, 2)
            if h < ho:
                return out + F.interpolate(x, scale_factor=2, mode="nearest")
            return out + F.avg_pool2d(x, kernel_size=st, stride=st)
        if not fuse_side:
            y = self._add_side(y, xm, use_smb=True, use_lora=h == ho)
        return y.view(b, ho, wo, -1).permute(0, 3, 1, 2)

    def _binary_int(self, xm: Tensor, scale: Tensor, b: int, h: int, w: int, ho: int,
                    wo: int) -> Tensor:
        """``sum_t s_t * (X_t @ taps[t])`` as float32 ``[B*Ho*Wo, Cout]`` (int32 GEMMs)."""
        k, st, p = self.kernel_size, self.stride, self.padding
        if k == 1 and st == 1 and p == 0:
            z = int_matmul(torch.sign(xm).to(torch.int8), self.taps[0])
            return z.float().mul_(scale.view(-1, 1))  # (int32 * float is a slow path)
        signs = xm.new_zeros((b, h + 2 * p, w + 2 * p, self.in_channels), dtype=torch.int8)
        signs[:, p:p + h, p:p + w] = torch.sign(xm).view(b, h, w, -1)
        scales = F.pad(scale, (p, p, p, p))
        acc = None
        for t in range(k * k):
            i, j = divmod(t, k)
            rows = slice(i, i + st * (ho - 1) + 1, st)
            cols = slice(j, j + st * (wo - 1) + 1, st)
            s_t = scales[:, rows, cols].reshape(-1, 1)
            z = int_matmul(signs[:, rows, cols].reshape(-1, self.in_channels), self.taps[t])
            if acc is None:
                acc = z.float().mul_(s_t)
            else:
                acc.addcmul_(z, s_t)
        return acc

    def _binary_float(self, x: Tensor, scale: Tensor) -> Tensor:
        """The same sum as a float conv of ``s * sign(x)`` with the ±1 weight."""
        weight = self._cached(("float",), lambda: self.signs().float())
        xb = scale.unsqueeze(1) * torch.sign(x)
        y = F.conv2d(xb, weight, None, self.stride, self.padding)
        return y.permute(0, 2, 3, 1).reshape(-1, self.out_channels)


class DeployBinaryLinear(_DeployBinary):
    """``[..., Cin] -> [..., Cout]``, = ``BiMaCoLinear`` (no RPReLU).

    ``signs`` int8 ``[Cout, Cin]``; ``alpha`` / ``bias`` ``[Cout]``; ``smb`` and ``lora`` as for
    :class:`DeployBinaryConv2d`. Stored as ``signs_t`` int8 ``[Cin, Cout]``.
    """

    def __init__(self, signs: Tensor, alpha: Tensor, bias: Tensor | None,
                 smb: tuple[Tensor, Tensor] | None = None, lora: tuple[Tensor, Tensor] | None = None,
                 mode: str = "auto", side: str = "auto"):
        super().__init__()
        if signs.dim() != 2:
            raise ValueError(f"linear signs must be [Cout, Cin], got {list(signs.shape)}")
        self.out_features, self.in_features = (int(s) for s in signs.shape)
        self._init_common(alpha, bias, smb, lora, mode, side)
        self.register_buffer("signs_t", signs.detach().to(torch.int8).t().contiguous())

    @classmethod
    def from_simulated(cls, layer: BiMaCoLinear, mode: str = "auto",
                       side: str = "auto") -> "DeployBinaryLinear":
        """Binarize ``layer``'s latent weight once; ``channel_threshold`` is dropped."""
        smb, lora = _side_of(layer)
        return cls(torch.sign(layer.weight.detach()).to(torch.int8), _alpha_of(layer.weight),
                   layer.bias, smb, lora, mode, side)

    def signs(self) -> Tensor:
        """The int8 signs ``[Cout, Cin]``."""
        return self.signs_t.t()

    @torch.compiler.disable  # see the module docstring
    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} expects [..., {self.in_features}], got "
                             f"{list(x.shape)}")
        plan = self._plan(x, 0)
        if plan is not None:
            xm = x.reshape(1, 1, -1, self.in_features).contiguous()
            return kernels.binary_conv_op(xm, *plan).view(*x.shape[:-1], self.out_features)
        with autocast_off(x.device.type):  # computes in float32, returns x.dtype
            if self._kernel_io(x):
                return self._forward(x)  # the kernel reads and writes bf16 itself
            return self._forward(x.float()).to(x.dtype)

    def _make_plan(self, dtype: torch.dtype, h: int) -> tuple | None:
        if dtype not in (torch.float32, torch.bfloat16) or not self._side_in_kernel():
            return None
        bits, mask = self._weight_bits(self.signs_t[None])
        return kernels.op_arguments(None, bits, mask, self.out_features, self.alpha, self._shift(), None, None, 1, 1,
                                    0, *self._kernel_side(use_lora=True))[1:]

    def _shift(self) -> Tensor:
        """The epilogue's shift: the bias, or zeros (cached)."""
        return self._cached(("shift",), lambda: self.alpha.new_zeros(self.out_features) if self.bias is None
                            else self.bias)

    def _forward(self, x: Tensor) -> Tensor:
        xm = x.reshape(-1, self.in_features).contiguous()
        path = self._path()
        fuse_side = self._side_in_kernel()
        if path == "fused":
            bits, mask = self._weight_bits(self.signs_t[None])
            shift = self._shift()
            lowrank, sparse = self._kernel_side(use_lora=True) if fuse_side else (None, None)
            y = kernels.binary_conv(xm.view(1, 1, -1, self.in_features), bits, mask,
                                    self.out_features, self.alpha, shift, None, None, 1, 1, 0,
                                    lowrank, sparse).view(-1, self.out_features)
        else:
            scale = xm.abs().mean(dim=1, keepdim=True)  # s, per row / token
            if path == "int":
                y = int_matmul(torch.sign(xm).to(torch.int8), self.signs_t).float().mul_(scale)
            else:
                weight = self._cached(("float",), lambda: self.signs_t.float())
                y = (scale * torch.sign(xm)) @ weight
            y.mul_(self.alpha)
            if self.bias is not None:
                y.add_(self.bias)
        if not fuse_side:
            y = self._add_side(y, xm, use_smb=True, use_lora=True)
        return y.view(*x.shape[:-1], self.out_features)


def to_deploy(model: nn.Module, mode: str = "auto", side: str = "auto") -> nn.Module:
    """Replace, in place, every ``BiMaCoConv2d`` / ``BiMaCoLinear`` of ``model`` (the model
    itself included) by its deploy layer; FP convs, norms and attention stay. Returns the model."""
    _check_mode(mode, side)
    convert = {BiMaCoConv2d: DeployBinaryConv2d, BiMaCoLinear: DeployBinaryLinear}
    if type(model) in convert:
        return convert[type(model)].from_simulated(model, mode, side)
    for name, module in list(model.named_modules()):
        if type(module) in convert:
            parent, _, child = name.rpartition(".")
            new = convert[type(module)].from_simulated(module, mode, side)
            setattr(model.get_submodule(parent), child, new.to(module.weight.device))
    return model


def set_mode(model: nn.Module, mode: str | None = None, side: str | None = None) -> nn.Module:
    """Switch every deploy layer of ``model`` to ``mode`` (``fused``/``int``/``float``/``auto``) and/or
    ``side`` (``sparse``/``dense``/``auto``). Returns the model."""
    for module in model.modules():
        if isinstance(module, _DeployBinary):
            _check_mode(mode or module.mode, side or module.side)
            module.mode, module.side = mode or module.mode, side or module.side
    return model
