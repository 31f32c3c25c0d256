"""Download the released weight files into weights/ (see weights/README.md).

    python scripts/download_weights.py --list
    python scripts/download_weights.py autoencoder_vq_f4.pth SinSR_v1.pth
    python scripts/download_weights.py all
    python scripts/download_weights.py BiMaCoSR.pth --drive_id <Google Drive file id>  # needs gdown

BiMaCoSR.pth has no direct URL: get it from the Google Drive link in the README of
https://github.com/Kai-Liu001/BiMaCoSR (or pass that link's file id with --drive_id).
"""
import argparse
import sys
from pathlib import Path

from bimacosr.weights import RELEASED, WEIGHTS_DIR, DownloadError, get, download


def show(dest: Path) -> None:
    """One block per released file: name, present/missing, path, what, use, source."""
    for entry in RELEASED.values():
        path = dest / entry.name
        status = f"present ({path.stat().st_size / 2**20:.1f} MiB)" if path.is_file() else "missing"
        print(f"{entry.name:30s} {status:22s} {path}")
        print(f"    {entry.what}; used by {entry.used_by}")
        print(f"    from: {entry.source}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"files ({', '.join(RELEASED)}) or 'all'")
    parser.add_argument("--dest", type=Path, default=WEIGHTS_DIR,
                        help="target folder (default: weights)")
    parser.add_argument("--force", action="store_true", help="download again even if present")
    parser.add_argument("--drive_id", help="Google Drive file id of the one named file (gdown)")
    parser.add_argument("--list", action="store_true",
                        help="list the files and whether they are present")
    args = parser.parse_args()
    if args.list or not args.names:
        show(args.dest)
        if not args.list:
            print("\nname the files to download, or 'all'")
        return 0
    names = list(RELEASED) if args.names == ["all"] else args.names
    if args.drive_id and len(names) != 1:
        parser.error("--drive_id fetches exactly one named file")
    try:
        names = [get(name).name for name in names]
    except KeyError as e:
        parser.error(e.args[0])
    failed = 0
    for name in names:
        try:
            path = download(name, args.dest, args.force, drive_id=args.drive_id)
        except DownloadError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
        else:
            print(f"{name}: {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
