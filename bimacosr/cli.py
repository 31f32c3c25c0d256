"""The one way this project's command lines are built: :func:`argument_parser`.

Every tool (``inference_quant.py``, ``main_distill.py``, ``metric.py``, ``app.py``, ``scripts/*.py``)
gets its ``ArgumentParser`` here, so all of them behave alike: the description is printed as
written, a flag's help ends with ``(default: X)`` only where that says something
(:class:`HelpFormatter`), and abbreviated flags are refused (``--tile 2`` is not ``--tile_batch 2``:
an abbreviation would silently change meaning when a flag is added).
"""
from __future__ import annotations

import argparse

__all__ = ["HelpFormatter", "argument_parser"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written; ``(default: X)`` appended to an option's help unless X is
    None or empty (nothing to say: required flags, "not given"), a switch is off by default, or
    the help already states its default in its own words."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is None or default == "" or default is argparse.SUPPRESS or "default" in text.lower()
                or (default is False and action.nargs == 0)):
            return text
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text  # a required positional argument
        return f"{text} (default: %(default)s)"


def argument_parser(description: str | None, **kwargs) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with :class:`HelpFormatter` and no abbreviated flags
    (``allow_abbrev=False``); ``kwargs`` go to ``ArgumentParser``."""
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter,
                                   allow_abbrev=False, **kwargs)
