"""Random weight files in the layouts pyiqa, torchvision and CLIP load, for every metric of
``evaluation.METRICS``: what a loopback server serves in place of the real hosts. The values only
have to load and give finite numbers; every tensor is a view of one small random buffer, so even
VGG-16 saves in ~1 MB.

Layouts are read off the libraries themselves: torchvision models built on the meta device; pyiqa's
own files captured by building each metric with ``load_pretrained_network`` recording the network
it would load into (and torchvision backbones given zeros); CLIP RN50 from pyiqa's CLIP class.
"""
from __future__ import annotations

import contextlib
import io
import sys
import warnings
from collections.abc import Iterator

import numpy as np
import scipy.io
import torch

from bimacosr.evaluation import METRICS, _timm_without_download

BUFFER = 1 << 16


def _strides(shape: tuple[int, ...], budget: int) -> list[int]:
    """Strides that keep every index of ``shape`` below ``budget``: contiguous where that fits,
    else the outer rows overlap (a stride smaller than the row, down to 0)."""
    if not shape:
        return []
    inner = _strides(shape[1:], budget)
    span = 1 + sum((d - 1) * s for d, s in zip(shape[1:], inner))
    if shape[0] == 1:
        return [span, *inner]
    return [max(0, min(span, (budget - span) // (shape[0] - 1))), *inner]


def views_of_one_buffer(shapes: dict[str, torch.Size], seed: int, positive: bool = False) -> dict[str, torch.Tensor]:
    """Random tensors (N(0, 0.02²), or its absolute value) of the given shapes, all views of one
    buffer (overlapping where a tensor is larger than it)."""
    buffer = torch.randn(BUFFER, generator=torch.Generator().manual_seed(seed)) * 0.02
    buffer = buffer.abs() if positive else buffer
    return {key: buffer.as_strided(tuple(shape), _strides(tuple(shape), BUFFER)) for key, shape in shapes.items()}


def saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _torchvision_layout(file_name: str) -> dict[str, torch.Size]:
    from torchvision.models import get_model, get_model_weights, list_models

    for model in list_models():
        if any(w.url.rsplit("/", 1)[-1] == file_name for w in get_model_weights(model)):
            with torch.device("meta"):
                return {k: v.shape for k, v in get_model(model, weights=None).state_dict().items()}
    raise KeyError(file_name)


@contextlib.contextmanager
def _recording(layouts: dict[str, tuple[dict[str, torch.Size], str | None]]) -> Iterator[None]:
    """pyiqa's ``load_pretrained_network`` records (layout, weight key) per file instead of
    loading; torchvision's pretrained backbones load zeros."""
    import pyiqa.archs  # noqa: F401
    from torchvision.models import _api

    def record(net, model_path, strict=True, weight_keys=None):
        layouts[str(model_path).rsplit("/", 1)[-1]] = ({k: v.shape for k, v in net.state_dict().items()}, weight_keys)

    def zeros(self, *args, **kwargs):
        return {k: torch.zeros(()).expand(v) for k, v in _torchvision_layout(self.url.rsplit("/", 1)[-1]).items()}

    patched = [(m, "load_pretrained_network") for name, m in list(sys.modules.items())
               if name.startswith("pyiqa.archs") and hasattr(m, "load_pretrained_network")]
    saved_attrs = [(m, a, getattr(m, a)) for m, a in patched] + [(_api.WeightsEnum, "get_state_dict",
                                                                   _api.WeightsEnum.get_state_dict)]
    for m, a in patched:
        setattr(m, a, record)
    _api.WeightsEnum.get_state_dict = zeros
    try:
        yield
    finally:
        for m, a, old in saved_attrs:
            setattr(m, a, old)


def _clip_rn50_layout() -> dict[str, torch.Size]:
    from pyiqa.archs.clip_model import CLIP

    with torch.device("meta"):  # RN50: embed 1024, 224 px, layers (3, 4, 6, 3), width 64, text 512 x 12
        model = CLIP(1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12)
    return {k: v.shape for k, v in model.state_dict().items()}


def served_files(names: list[str]) -> dict[str, bytes]:
    """File name -> bytes of every weight file the metrics ``names`` need."""
    import pyiqa

    wanted = {file for name in names for _, file in METRICS[name].weights}
    files: dict[str, bytes] = {}
    layouts: dict[str, tuple[dict[str, torch.Size], str | None]] = {}
    with _recording(layouts), _timm_without_download(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's "pretrained is deprecated", as pyiqa calls it
        for name in names:
            if name in ("lpips", "dists", "fid", "musiq", "maniqa-pipal"):
                pyiqa.create_metric(METRICS[name].pyiqa_id, device="cpu", **METRICS[name].options)
    for seed, (file, (layout, key)) in enumerate(sorted(layouts.items())):
        if file in wanted:
            state = views_of_one_buffer(layout, seed, positive=True)  # pyiqa's heads: DISTS takes square roots
            files[file] = saved({key: state} if key else state)
    for seed, file in enumerate(sorted(wanted)):
        if file.startswith(("alexnet", "vgg")):
            files[file] = saved(views_of_one_buffer(_torchvision_layout(file), 100 + seed))
    if "RN50.pt" in wanted:
        files["RN50.pt"] = saved(views_of_one_buffer(_clip_rn50_layout(), 200))
    if "CLIP-IQA+_learned_prompts-603f3273.pth" in wanted:  # the two prompts' 16 context tokens
        files["CLIP-IQA+_learned_prompts-603f3273.pth"] = saved(torch.randn(2, 16, 512) * 0.02)
    if "niqe_modelparameters.mat" in wanted:
        from tests.conftest import REPO

        params = np.load(REPO / "bimacosr/assets/niqe_pris_params.npz")
        mat = io.BytesIO()
        scipy.io.savemat(mat, {"mu_prisparam": params["mu_pris_param"], "cov_prisparam": params["cov_pris_param"]})
        files["niqe_modelparameters.mat"] = mat.getvalue()
    missing = wanted - set(files)
    assert not missing, f"no layout for {missing}"
    return files
