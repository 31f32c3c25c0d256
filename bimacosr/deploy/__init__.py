"""Deployment of BiMaCo denoisers: packed 1-bit files and integer-arithmetic layers.

``format`` reads and writes the file (no model code), ``convert`` turns a model into a file and
back, ``layers`` holds the deploy layers, ``packing`` the sign bits.
"""
from bimacosr.deploy.convert import ExportInfo, deploy_params, export_deploy, fp_float32_bytes, load_deploy
from bimacosr.deploy.format import DeployFileError, read_deploy_file, write_deploy_file
from bimacosr.deploy.layers import DeployBinaryConv2d, DeployBinaryLinear, int_matmul, set_mode, to_deploy
from bimacosr.deploy.packing import pack_signs, unpack_signs

__all__ = ["DeployBinaryConv2d", "DeployBinaryLinear", "DeployFileError", "ExportInfo",
           "deploy_params", "export_deploy", "fp_float32_bytes", "int_matmul", "load_deploy",
           "pack_signs", "read_deploy_file", "set_mode", "to_deploy", "unpack_signs",
           "write_deploy_file"]
