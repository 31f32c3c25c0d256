"""Binary layers (BiMaCo and the Table 1 baselines) and the pass that swaps them into a model."""
from bimacosr.quant.bimaco import BiMaCoConv2d, BiMaCoLinear
from bimacosr.quant.convert import LAYERS, QUANT_KEYS, binarize, convert_layer

__all__ = ["BiMaCoConv2d", "BiMaCoLinear", "LAYERS", "QUANT_KEYS", "binarize", "convert_layer"]
