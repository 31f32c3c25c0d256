"""Every command line is built by bimacosr.cli.argument_parser: defaults shown once and only where
they say something, abbreviated flags refused."""
import re

import pytest

import inference_quant
import metric
from bimacosr.cli import argument_parser
from tests.conftest import REPO


def help_text() -> str:
    p = argument_parser("demo")
    p.add_argument("-i", "--in_path", required=True, help="input")
    p.add_argument("--steps", type=int, default=None, help="steps (default: the config's)")
    p.add_argument("--rounds", type=int, default=5, help="rounds")
    p.add_argument("--flag", action="store_true", help="a switch")
    p.add_argument("--suffix", default="", help="name suffix")
    return " ".join(p.format_help().split())


def test_defaults_are_shown_once_and_only_when_they_say_something():
    text = help_text()
    assert "input -i" not in text and "(default: None)" not in text and "(default: False)" not in text
    assert "steps (default: the config's) --rounds" in text  # not a second "(default: None)"
    assert "rounds (default: 5)" in text and "a switch --suffix" in text and "(default: )" not in text


def test_inference_help_has_no_empty_or_double_defaults(capsys):
    with pytest.raises(SystemExit):
        inference_quant.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and not re.search(r"\(default[^)]*\) \(default", text)
    assert "LR image file or folder -o" in text and "(default: 256)" in text


@pytest.mark.parametrize("parse, argv, abbreviation", [
    (inference_quant.parse_args, ["-i", "a", "-o", "b", "--tile_b", "2"], "--tile_b"),
    (inference_quant.parse_args, ["-i", "a", "-o", "b", "--chop", "128"], "--chop"),
    (metric.parse_args, ["--inp", "sr/", "--log", "logs/"], "--inp"),
])
def test_abbreviated_flags_are_refused(parse, argv, abbreviation, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(argv)
    assert exit_.value.code == 2 and abbreviation in capsys.readouterr().err


def test_every_command_line_uses_the_one_parser():
    """No tool builds an ArgumentParser of its own (allow_abbrev and the help format would differ)."""
    tools = [*REPO.glob("*.py"), *REPO.glob("scripts/*.py"), *REPO.glob("bimacosr/**/*.py")]
    own = [str(p.relative_to(REPO)) for p in tools
           if "ArgumentParser(" in p.read_text() and p != REPO / "bimacosr/cli.py"]
    assert own == []
    assert all("argument_parser(" in p.read_text() for p in REPO.glob("scripts/*.py"))
