"""Params and OPs of the FP and BiMaCo UNets and the VQ encoder/decoder (docs/denoiser.md §5).

Counts shapes only (meta device, no weights). Prints a Markdown table: the FP UNet and BiMaCo
under the paper's rule (1-bit params /32, 1-bit MACs /64, the subset that gives 4.98 M) and under
the complete rule (everything stored / executed), and the VQ stages at the matching image size.

    python scripts/count_ops.py --latent 64 [--json counts.json]
"""
import json
from dataclasses import asdict
from pathlib import Path

import torch

from bimacosr.build import build_autoencoder, build_denoiser_from_config
from bimacosr.cli import argument_parser
from bimacosr.config import load_config
from bimacosr.ops_count import complete_rule, count_autoencoder, count_denoiser, paper_rule

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=64, help="latent size (a multiple of 64); image = 4x")
    parser.add_argument("--config", default=str(REPO / "configs/BiMaCoSR.yaml"))
    parser.add_argument("--json", help="also save every count and cost here")
    args = parser.parse_args()
    if args.latent <= 0 or args.latent % 64:
        parser.error("--latent must be a positive multiple of 64 (the Swin windows need it)")

    cfg = load_config(args.config)
    fp = count_denoiser(build_denoiser_from_config(cfg, "teacher", meta=True), args.latent)
    bm = count_denoiser(build_denoiser_from_config(cfg, "student", meta=True), args.latent)
    with torch.device("meta"):
        vq = build_autoencoder(cfg, "meta", weights=False)
    enc, dec = count_autoencoder(vq, 4 * args.latent)
    columns = {
        "FP UNet (paper rule)": (paper_rule(fp), paper_rule(fp)),
        "BiMaCo (paper rule)": (paper_rule(bm), paper_rule(fp)),
        "FP UNet (complete)": (complete_rule(fp), complete_rule(fp)),
        "BiMaCo (complete)": (complete_rule(bm), complete_rule(fp)),
        "BiMaCo (complete, lean)": (complete_rule(bm, index_bits=16, include_unused=False), complete_rule(fp)),
        "VQ encoder": (complete_rule(enc), complete_rule(fp)),
        "VQ decoder": (complete_rule(dec), complete_rule(fp)),
    }
    print(f"Latent {args.latent}x{args.latent} (image {4 * args.latent}x{4 * args.latent}), batch 1; "
          f"OPs = MACs, binary MACs counted /64.\n")
    print("| | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    rows = [("Params (M)", lambda c, r: f"{c.params / 1e6:.3f}"),
            ("OPs (G)", lambda c, r: f"{c.ops / 1e9:.3f}"),
            ("Size (MB, 4 B per param)", lambda c, r: f"{c.megabytes:.2f}"),
            ("Params: FP / this", lambda c, r: f"{r.params / c.params:.1f}x"),
            ("OPs: FP / this", lambda c, r: f"{r.ops / c.ops:.1f}x" if c.ops <= r.ops else f"{r.ops / c.ops:.2f}x")]
    for label, fmt in rows:
        print(f"| {label} | " + " | ".join(fmt(c, r) for c, r in columns.values()) + " |")

    p_bm, c_bm, c_fp = paper_rule(bm), complete_rule(bm), complete_rule(fp)
    vq_ops = complete_rule(enc).ops + complete_rule(dec).ops
    g = {k: v / 1e9 for k, v in bm.macs.items()}
    text = f"""The paper's 118.59 M -> 4.98 M params is the **paper rule**: binary latent weights /32 + LRMB + the two
FP convs + the relative-position tables ({p_bm.params / 1e6:.3f} M); it leaves out SMB values
({bm.param('smb_values'):,}) and indices ({bm.param('smb_indices'):,}), the binarized layers' biases
({bm.param('binary_bias'):,}), RPReLU ({bm.param('rprelu'):,}), GroupNorm ({bm.param('groupnorm'):,}), the
unused move0/channel_threshold ({bm.param('move0', 'channel_threshold'):,}) and the {bm.alpha:,} per-channel
scales a 1-bit file must store, while its FP count keeps GroupNorm and biases. Its OPs (binary MACs
/64 + FP convs + LoRA, no SMB, no attention matmuls) give {p_bm.ops / 1e9:.2f} G, not the paper's 1.83 G
(FP side {paper_rule(fp).ops / 1e9:.2f} G vs the paper's 50.23 G); adding the SMB ({g.get('smb', 0):.3f} G as
nnz x positions) gives {(p_bm.ops + bm.mac('smb')) / 1e9:.2f} G, so 1.83 G was not reproduced by any sensible rule.
The **complete rule** (1-bit weights, everything else fp32 incl. SMB indices and alpha; every executed
MAC incl. SMB and {g.get('attention', 0):.3f} G of window attention) gives {c_bm.params / 1e6:.3f} M and
{c_bm.ops / 1e9:.2f} G ({c_fp.params / c_bm.params:.1f}x / {c_fp.ops / c_bm.ops:.1f}x); "lean" drops the unused
parameters and stores indices in 16 bit. The SMB as the dense product the reference code runs would be
{g.get('smb_dense', 0):.2f} G. End to end, the VQ encoder + decoder take {vq_ops / 1e9:.1f} G, {vq_ops / c_bm.ops:.0f}x the
BiMaCo UNet and {vq_ops / c_fp.ops:.1f}x the FP UNet: the UNet is {100 * c_bm.ops / (vq_ops + c_bm.ops):.1f} % of
the binary pipeline's compute (VQ columns: complete rule, decoder includes the codebook search)."""
    print("\n" + " ".join(text.split()))

    if args.json:
        nets = {"fp_unet": fp, "bimaco_unet": bm, "vq_encoder": enc, "vq_decoder": dec}
        out = {"latent": args.latent, "counts": {k: asdict(v) for k, v in nets.items()},
               "costs": {k: {"params": c.params, "ops": c.ops} for k, (c, _) in columns.items()}}
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
