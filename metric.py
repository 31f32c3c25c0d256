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

Table 1 side by side: ``--table1 ROOT`` scores each ``--inp_imgs`` folder as one method over the
paper's test sets, ``ROOT/<set>/HR`` (GT) against ``METHOD/<set>`` (SR), sets RealSR, DRealSR and
DIV2K-Val, in the paper's nine columns, and prints the paper's rows for SinSR, ResShift and
BiMaCoSR beside them (``bimacosr/table1.py``; ``table1.md``/``table1.json`` plus the usual files
per set in ``--out/<set>``)::

    python metric.py --table1 data/test --inp_imgs results/BiMaCoSR results/SinSR --log logs/table1
"""
from __future__ import annotations

import argparse
import sys

from bimacosr.cli import argument_parser
from bimacosr.evaluation import METRICS, EvaluationError, evaluate, metric_name, write_results
from bimacosr.table1 import COLUMNS, DATASETS, score_table1, write_table1


def metric_type(text: str) -> str:
    try:
        return metric_name(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The original flags plus ``--suffix``, ``--table1``, ``--weights_dir``, ``--offline``, ``--device``,
    ``--out``."""
    parser = argument_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--inp_imgs", nargs="+", required=True, metavar="DIR",
                        help="SR folder(s) (with --table1: method folders); each becomes one row of the table")
    parser.add_argument("--gt_imgs", metavar="DIR", help="GT folder (full-reference metrics, FID)")
    parser.add_argument("--log", required=True, metavar="DIR", help="results folder (the original's flag; --out overrides it)")
    parser.add_argument("--log_name", metavar="NAME",
                        help="also write the original's log, <log>/test_<NAME>_<yymmdd-HHMMSS>.log")
    parser.add_argument("--metrics", nargs="+", type=metric_type, metavar="NAME",
                        help=f"subset of: {' '.join(METRICS)}, any case, also the original's MANIQA / CLIPIQA+ "
                             f"(default: all; with --table1: {' '.join(COLUMNS)})")
    parser.add_argument("--table1", metavar="ROOT",
                        help=f"Table 1: ROOT/<set>/HR against <method>/<set> for each --inp_imgs method folder, "
                             f"sets {' '.join(DATASETS)}; the paper's rows beside them")
    parser.add_argument("--suffix", default="", metavar="SUFFIX",
                        help="SR files are <GT name>_<SUFFIX> (inference_quant.py --suffix); default: "
                             "detected when every SR name is a GT name plus one suffix")
    parser.add_argument("--weights_dir", metavar="DIR",
                        help="folder holding metric weight files by their file names")
    parser.add_argument("--offline", action="store_true",
                        help="never download: metrics whose weight files are not cached are skipped")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", metavar="DIR", help="results folder instead of --log's (default: the --log folder)")
    args = parser.parse_args(argv)
    if args.table1 and args.gt_imgs:
        parser.error("--table1 takes the GT folders from ROOT/<set>/HR: leave out --gt_imgs")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation; print the table and the written paths; 2 on input errors."""
    args = parse_args(argv)
    try:
        if args.table1:
            result = score_table1(args.table1, args.inp_imgs, args.metrics, args.weights_dir, args.device,
                                  args.suffix, args.offline)
            paths = write_table1(result, args.out or args.log, args.log_name)
        else:
            result = evaluate(args.inp_imgs, args.gt_imgs, args.metrics, args.weights_dir, args.device,
                              args.suffix, args.offline)
            paths = write_results(result, args.out or args.log, args.log_name)
    except (EvaluationError, OSError) as exc:  # OSError: unreadable image, unwritable output
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.markdown(), end="")
    print("\n" + "\n".join(f"wrote {p}" for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
