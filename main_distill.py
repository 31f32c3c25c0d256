"""Distill a binary one-step BiMaCoSR student from the ResShift teacher (torchrun entry point).

Not implemented yet: tracked by the distillation-training issue.
"""
import sys

if __name__ == "__main__":
    sys.exit("main_distill.py: not implemented yet (see the distillation-training issue)")
