"""Download the released weight files into <repo>/weights (see weights/README.md).

    python scripts/download_weights.py inference     # autoencoder + BiMaCoSR.pth: enough to run inference_quant.py
    python scripts/download_weights.py train         # + the ResShift teacher and SinSR_v1.pth (main_distill.py)
    python scripts/download_weights.py all           # every file, the released config included
    python scripts/download_weights.py SinSR_v1.pth  # single files by name
    python scripts/download_weights.py --list        # what is present

Public files come from the ResShift / SinSR GitHub releases; BiMaCoSR.pth (and its config) from
Google Drive through gdown. Each download is checked to load as the right kind of file and its
size and sha256 are recorded in weights.lock.json beside it; files already present are checked
against that record. Exit status 0 when every requested file is present and verified.
"""
import argparse
import sys
from pathlib import Path

from bimacosr.weights import LOCK_NAME, RELEASED, TARGETS, WEIGHTS_DIR, WeightsError, download, expand_targets

ACTIONS = {"downloaded": "downloaded, recorded in", "verified": "present, matches",
           "recorded": "present, recorded in"}


def show(dest: Path) -> None:
    """One block per released file: name, present/missing, path, what, use, source."""
    for entry in RELEASED.values():
        path = dest / entry.name
        status = f"present ({path.stat().st_size / 2**20:.1f} MiB)" if path.is_file() else "missing"
        print(f"{entry.name:30s} {status:22s} {path}")
        print(f"    {entry.what}; used by {entry.used_by}")
        print(f"    from: {entry.source}")
    print("targets: " + "; ".join(f"{name} = {' + '.join(files)}" for name, files in TARGETS.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*",
                        help=f"targets ({', '.join(TARGETS)}) or files ({', '.join(RELEASED)})")
    parser.add_argument("--dest", type=Path, default=WEIGHTS_DIR, help="target folder (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="download again even if present")
    parser.add_argument("--with_config", action="store_true",
                        help="also fetch BiMaCoSR.yaml, the released config (configs/BiMaCoSR.yaml has its values)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    parser.add_argument("--list", action="store_true", help="list the files and whether they are present")
    args = parser.parse_args()
    if args.list or not args.names:
        show(args.dest)
        if not args.list:
            print("\nname a target or files to download, e.g. 'inference'")
        return 0
    try:
        names = expand_targets(args.names + (["BiMaCoSR.yaml"] if args.with_config else []))
    except KeyError as e:
        parser.error(e.args[0])
    failed = 0
    for name in names:
        try:
            fetched = download(name, args.dest, args.force, progress=not args.no_progress)
        except WeightsError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
        else:
            print(f"{name}: {ACTIONS[fetched.action]} {LOCK_NAME}: {fetched.path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
