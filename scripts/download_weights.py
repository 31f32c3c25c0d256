"""Download the released weight files into <repo>/weights, and the metrics' files into their caches.

    python scripts/download_weights.py inference     # autoencoder + BiMaCoSR.pth: enough to run inference_quant.py
    python scripts/download_weights.py train         # + the ResShift teacher and SinSR_v1.pth (main_distill.py)
    python scripts/download_weights.py metrics       # every file the paper's metrics need (metric.py)
    python scripts/download_weights.py all           # all of the above, the released config included
    python scripts/download_weights.py lpips SinSR_v1.pth  # one metric's files, single files by name
    python scripts/download_weights.py --list        # every file: verified, unverified or missing

Public files come from the ResShift / SinSR GitHub releases; BiMaCoSR.pth (and its config) from
Google Drive through gdown; the metric files from the URLs pyiqa, torchvision and CLIP use, into
their caches under torch.hub.get_dir() (--dest applies to the released files only). Each download
is checked (the right kind of file; for metric files: loadable without running code) and its size
and sha256 are recorded in weights.lock.json beside it; files already present are checked against
that record. Exit status 0 when every requested file is present and verified.
"""
import os
import sys
from pathlib import Path

from bimacosr.cli import argument_parser
from bimacosr.evaluation import METRICS, metric_name
from bimacosr.metric_weights import metric_files, status
from bimacosr.weights import LOCK_NAME, RELEASED, TARGETS, WEIGHTS_DIR, WeightFile, WeightsError, expand_targets, fetch

ACTIONS = {"downloaded": "downloaded, recorded in", "verified": "present, matches",
           "recorded": "present, recorded in"}


def resolve(names: list[str], dest: Path) -> list[tuple[WeightFile, Path]]:
    """Targets, metric names and file names -> (entry, folder) pairs, each once, in order.
    Raises KeyError naming the choices."""
    metric_entries = {f.name: f.entry() for f in metric_files()}
    chosen: list[tuple[WeightFile, Path]] = []
    for name in names:
        if name in ("metrics", "all"):
            chosen += [(e, e.folder) for e in metric_entries.values()]
        if name in metric_entries:
            chosen.append((metric_entries[name], metric_entries[name].folder))
            continue
        try:
            chosen += [(metric_entries[f.name], f.path.parent) for f in metric_files([metric_name(name)])]
            continue
        except ValueError:
            pass
        if name != "metrics":
            try:
                chosen += [(RELEASED[n], dest) for n in expand_targets([name])]
            except KeyError:
                raise KeyError(f"unknown target or file {name!r}; targets: {', '.join([*TARGETS, 'metrics'])}; "
                               f"metrics: {', '.join(METRICS)}; files: {', '.join([*RELEASED, *metric_entries])}") from None
    return list(dict.fromkeys(chosen))


def show(dest: Path) -> None:
    """One line per file: name, status, path; the released files with what they are."""
    for entry in RELEASED.values():
        print(f"{entry.name:40s} {status(entry, dest / entry.name):12s} {dest / entry.name}")
        print(f"    {entry.what}; used by {entry.used_by}; from {entry.source}")
    for file in metric_files():
        users = ", ".join(m for m, spec in METRICS.items() if (file.location, file.name) in spec.weights)
        print(f"{file.name:40s} {status(file.entry(), file.path):12s} {file.path}")
        print(f"    weights of metric {users}; from {file.entry().urls[0]}")
    print("targets: " + "; ".join(f"{name} = {' + '.join(files)}" for name, files in TARGETS.items())
          + "; metrics = every metric file; all also fetches the metric files")


def main() -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("names", nargs="*", help="targets (inference, train, metrics, all), metric names or file names")
    parser.add_argument("--dest", type=Path, default=WEIGHTS_DIR, help="folder of the released files (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="download again even if present")
    parser.add_argument("--with_config", action="store_true",
                        help="also fetch BiMaCoSR.yaml, the released config (configs/BiMaCoSR.yaml has its values)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    parser.add_argument("--list", action="store_true", help="list every file: verified, unverified or missing")
    args = parser.parse_args()
    if args.list or not args.names:
        show(args.dest)
        if not args.list:
            print("\nname a target or files to download, e.g. 'inference'")
        return 0
    try:
        chosen = resolve(args.names + (["BiMaCoSR.yaml"] if args.with_config else []), args.dest)
    except KeyError as e:
        parser.error(e.args[0])
    failed = 0
    for entry, folder in chosen:
        try:
            fetched = fetch(entry, folder, args.force, progress=not args.no_progress)
        except (WeightsError, OSError) as e:  # OSError: a read-only or full destination
            print(f"error: {e}", file=sys.stderr)
            failed += 1
        else:
            print(f"{entry.name}: {ACTIONS[fetched.action]} {LOCK_NAME}: {fetched.path}")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `--list | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
