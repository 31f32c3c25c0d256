"""BiMaCoSR web demo (Gradio): upload a low-resolution image, get it 4x larger with a before/after
slider, a comparison panel and the SR image as a PNG download.

    python scripts/download_weights.py inference && python app.py     # then open http://127.0.0.1:7860
    python app.py --smoke                                              # tiny random weights: starts anywhere
    python app.py --deploy weights/BiMaCoSR_deploy.safetensors         # the packed 1-bit file

The page is served on 127.0.0.1 only unless --host says otherwise. Uploads and results live in one
temporary folder, bimacosr-demo-*, holding the latest --keep requests' files; it is removed when the
demo stops (Ctrl-C or SIGTERM). The logic is in bimacosr/demo.py.
"""
import argparse
import signal
import socket
import sys
import time
from pathlib import Path

from bimacosr import build
from bimacosr.checkpoint import CheckpointError
from bimacosr.cli import argument_parser
from bimacosr.config import DEFAULT_CONFIG, ConfigError, load_config
from bimacosr.deploy import DeployFileError
from bimacosr.device import pick_device
from bimacosr.inference import default
from bimacosr.smoke import smoke_inference
from bimacosr.weights import MissingWeightsError


def parse_args() -> argparse.Namespace:
    p = argument_parser(__doc__)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="original YAML config (default: %(default)s)")
    p.add_argument("--ckpt", type=Path, default=default("ckpt"),
                   help="denoiser weights (default: %(default)s)")
    p.add_argument("--deploy", type=Path, default=None,
                   help="packed 1-bit file from scripts/export_deploy.py (--ckpt unused)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny random weights of configs/smoke.yaml (written to ~/.cache/bimacosr/data/smoke on "
                        "first use; --config/--ckpt/--deploy unused): checks the demo runs, the pictures are noise")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: CUDA if present)")
    p.add_argument("--max_side", type=int, default=1024, help="largest LR side accepted (default: %(default)s)")
    p.add_argument("--keep", type=int, default=16,
                   help="requests whose upload and results stay on disk for download (default: %(default)s; the "
                        "download button needs them)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    return p.parse_args()


def port_in_use(host: str, port: int) -> bool:
    """Whether a server already listens on ``host:port`` (probed as the web server binds it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def main() -> int:
    args = parse_args()
    if args.keep < 1:
        print(f"error: --keep {args.keep}: pass --keep 1 or more (the latest result is downloaded from disk)",
              file=sys.stderr)
        return 2
    if port_in_use(args.host, args.port):
        print(f"error: port {args.port} is in use: pass --port N (a free port)", file=sys.stderr)
        return 2
    try:
        device = pick_device(args.device)  # before smoke mode writes or builds anything
        if args.smoke:
            cfg, ckpt, deploy = *smoke_inference(), None
        else:
            cfg, ckpt, deploy = load_config(args.config), args.ckpt, args.deploy
        files = build.inference_files(cfg, ckpt, deploy)  # every file checked before anything is built
        from bimacosr.demo import Upscaler, build_ui  # gradio takes seconds to import: after the checks

        start = time.perf_counter()
        print(f"loading {files.deploy or files.ckpt} and {files.autoencoder} on {device} ...", flush=True)
        # SIGTERM as Ctrl-C: the server closes and the temporary folder is removed at exit
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        upscaler = Upscaler(cfg, files, device, max_side=args.max_side, keep=args.keep)
        print(f"loaded in {time.perf_counter() - start:.1f} s", flush=True)
    except (ConfigError, CheckpointError, DeployFileError, MissingWeightsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    note = "smoke mode: tiny random weights, the output is noise" if args.smoke else ""
    build_ui(upscaler, note).launch(server_name=args.host, server_port=args.port, share=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
