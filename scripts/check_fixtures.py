"""Run reference fixtures against this implementation: one line per check, exit 1 on any failure.

    python scripts/check_fixtures.py ../shared/reference/fixtures/denoiser ../shared/reference/fixtures/baselines
"""
import sys

import torch

from bimacosr.cli import argument_parser
from bimacosr.parity import check_paths


def main() -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("paths", nargs="+", help="fixture folders or .pt files")
    parser.add_argument("--threads", type=int, default=max(2, torch.get_num_threads()),
                        help="CPU threads (the fixtures are bit-exact at >= 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = check_paths(args.paths)
    for check in results:
        print(check.line())
    n_failed = sum(not c.passed for c in results)
    print(f"{len(results) - n_failed} passed, {n_failed} failed")
    return 1 if n_failed else 0


if __name__ == "__main__":
    sys.exit(main())
