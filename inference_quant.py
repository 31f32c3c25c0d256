"""One-command LR -> SR inference with the released BiMaCoSR weights.

Not implemented yet: tracked by the inference issue.
"""
import sys

if __name__ == "__main__":
    sys.exit("inference_quant.py: not implemented yet (see the inference issue)")
