"""The documents stay true: every command the README gives names a script that exists and only flags it takes."""
import importlib.util
import os
import re
import sys

import pytest

from conftest import ROOT

DOCUMENTS = ("README.md", "EXPERIMENTS.md", "BENCHMARKS.md", os.path.join("data", "README.md"))


def shell_commands(document: str) -> list[str]:
    """The `python X.py ...` commands of a Markdown file's bash blocks, and the `python X.py ...` it quotes inline."""
    text = open(os.path.join(ROOT, document)).read()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = [line.split("#")[0] for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    lines += re.findall(r"`(python [^`]+)`", text)
    return [m.group(0) for line in lines for m in [re.search(r"python (\S+\.py)(.*)", line)] if m and "-m " not in line]


def options_of(script: str) -> set[str]:
    spec = importlib.util.spec_from_file_location(os.path.basename(script)[:-3] + "_for_docs", os.path.join(ROOT, script))
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return {o for action in module.get_args_parser()._actions for o in action.option_strings}


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_command_names_a_script_and_flags_it_takes(document):
    commands = shell_commands(document)
    assert commands or document != "README.md"
    known = {}
    for command in commands:
        script, rest = re.match(r"python (\S+\.py)(.*)", command).groups()
        assert os.path.isfile(os.path.join(ROOT, script)), f"{document}: {command}: no {script}"
        own, _, passed_on = rest.partition(" -- ")  # experiments/folds.py hands what follows -- to train.py
        for name, part in ((script, own), ("train.py", passed_on)):
            if name not in known:
                known[name] = options_of(name)
            for flag in re.findall(r"(?<!\S)(--[a-z][a-z0-9-]*)", part):
                assert flag in known[name], f"{document}: {command}: {name} has no {flag}"


def test_readme_is_a_short_guide():
    text = open(os.path.join(ROOT, "README.md")).read()
    assert len(text.splitlines()) <= 200 and len(text) <= 12_000
    first = re.search(r"```bash\n(.*?)```", text, re.S).group(1).splitlines()
    assert "python train.py --demo" in first[0] and "python -m pytest" in first[1]


def test_experiments_opens_with_its_answer():
    lines = open(os.path.join(ROOT, "EXPERIMENTS.md")).read().splitlines()
    assert len(lines) <= 250 and len("\n".join(lines)) <= 25_000
    assert any(line.startswith("| recipe |") for line in lines[:40])
