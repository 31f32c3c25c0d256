"""Deployment of BiMaCo denoisers: packed 1-bit files and integer-arithmetic layers."""
from bimacosr.deploy.file import (FP_SINSR_BYTES, DeployFileError, ExportInfo, export_checkpoint,
                                  export_deploy, load_deploy, read_deploy_file)
from bimacosr.deploy.layers import (DeployBinaryConv2d, DeployBinaryLinear, int_matmul, set_mode,
                                    to_deploy)
from bimacosr.deploy.packing import pack_signs, unpack_signs

__all__ = ["DeployBinaryConv2d", "DeployBinaryLinear", "DeployFileError", "ExportInfo",
           "FP_SINSR_BYTES", "export_checkpoint", "export_deploy", "int_matmul", "load_deploy",
           "pack_signs", "read_deploy_file", "set_mode", "to_deploy", "unpack_signs"]
