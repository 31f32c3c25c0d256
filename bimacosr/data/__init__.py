"""Training and validation data: Real-ESRGAN kernels (``kernels``), JPEG artefacts (``jpeg``), the
second-order degradation (``degradation``), image crops/resizes (``transforms``) and the datasets
(``datasets``). Import from the submodules."""
