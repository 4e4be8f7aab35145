"""--help of the table stages and the demo: every flag explained, required flags without a
"(default: None)", defaults shown, an example command at the end."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ablate  # noqa: E402
import calibrate  # noqa: E402
import demo  # noqa: E402
import evaluate  # noqa: E402
import train_policy  # noqa: E402


def demo_parser():
    captured = {}

    class Stop(Exception):
        pass

    def grab(self, argv=None):
        captured["parser"] = self
        raise Stop

    from cli import ArgumentParser
    old = ArgumentParser.parse_args
    ArgumentParser.parse_args = grab
    try:
        with pytest.raises(Stop):
            demo.parse_args([])
    finally:
        ArgumentParser.parse_args = old
    return captured["parser"]


PARSERS = {"train_policy.py": train_policy.build_parser, "calibrate.py": calibrate.build_parser,
           "evaluate.py": evaluate.build_parser, "demo.py": demo_parser,
           "ablate.py": ablate.build_parser}


@pytest.mark.parametrize("name", PARSERS)
def test_every_flag_has_help_and_an_example(name):
    parser = PARSERS[name]()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help and action.help.strip(), (name, action.option_strings)
        if action.required:
            assert "default" not in action.help.lower(), (name, action.option_strings)
    text = parser.format_help()
    assert "(default: None)" not in text
    assert "example:" in text and f"python {name}" in text.split("example:")[1]


def test_defaults_are_shown():
    text = train_policy.build_parser().format_help()
    assert "(default reinforce)" in text and "(default 0.01)" in text
    for parser in (train_policy.build_parser(), calibrate.build_parser()):
        out = next(a for a in parser._actions if a.dest == "out")
        assert out.required
