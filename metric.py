"""Score SR folders with the paper's Table 1 metrics (docs/pipeline.md §7.2), through pyiqa.

    python metric.py --inp_imgs results/sr [more SR folders] --gt_imgs data/test/HR --log logs/eval

SR and GT images are paired by file name (stem); unpaired files are named. Outputs of
``inference_quant.py --suffix out`` (``a_out.png``) pair with ``a.png``: pass ``--suffix out``, or
let it be detected (when no SR name is a GT name but every SR name is a GT name plus one common
``_<suffix>``; one note says so). Its ``--compare`` panels (``a_out_compare.png`` next to
``a_out.png``) are not SR outputs and are left out. Rule: ``bimacosr/pairing.py``. Without ``--gt_imgs``
only the no-reference metrics run. Weight files not in the cache are fetched from the URLs pyiqa
uses (``--offline``: never; a metric whose files cannot be had is skipped with the URL, the path and
the fetch command); ``--weights_dir`` points at local copies. No weight file can run code. Writes
``metrics_per_image.csv``, ``metrics_summary.json`` and ``metrics_table.md`` to ``--out``
(default: the ``--log`` folder) and prints the Markdown table. Exit status 2 on input errors.
"""
from __future__ import annotations

import argparse
import sys

from bimacosr.evaluation import METRICS, EvaluationError, evaluate, metric_name, write_results


def metric_type(text: str) -> str:
    try:
        return metric_name(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The original flags plus ``--suffix``, ``--weights_dir``, ``--offline``, ``--device`` and ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inp_imgs", nargs="+", required=True, metavar="DIR",
                        help="SR folder(s); each becomes one row of the table")
    parser.add_argument("--gt_imgs", metavar="DIR", help="GT folder (full-reference metrics, FID)")
    parser.add_argument("--log", required=True, metavar="DIR", help="folder for the results")
    parser.add_argument("--log_name", metavar="NAME",
                        help="also write the original's log, <log>/test_<NAME>_<yymmdd-HHMMSS>.log")
    parser.add_argument("--metrics", nargs="+", type=metric_type, default=list(METRICS), metavar="NAME",
                        help=f"subset of: {' '.join(METRICS)}, any case, also the original's MANIQA / CLIPIQA+ "
                             f"(default: all)")
    parser.add_argument("--suffix", default="", metavar="SUFFIX",
                        help="SR files are <GT name>_<SUFFIX> (inference_quant.py --suffix); default: "
                             "detected when every SR name is a GT name plus one suffix")
    parser.add_argument("--weights_dir", metavar="DIR",
                        help="folder holding metric weight files by their file names")
    parser.add_argument("--offline", action="store_true",
                        help="never download: metrics whose weight files are not cached are skipped")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", metavar="DIR", help="results folder (default: --log)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation; print the table and the written paths; 2 on input errors."""
    args = parse_args(argv)
    try:
        result = evaluate(args.inp_imgs, args.gt_imgs, args.metrics, args.weights_dir,
                          args.device, args.suffix, args.offline)
        paths = write_results(result, args.out or args.log, args.log_name)
    except (EvaluationError, OSError) as exc:  # OSError: unreadable image, unwritable output
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.markdown(), end="")
    print("\n" + "\n".join(f"wrote {p}" for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
