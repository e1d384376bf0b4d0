"""Setup files: requirements.txt and environment.yml pin the same packages; CI runs make test."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pins(text: str) -> dict:
    found = re.findall(r"^\s*(?:-\s*)?([A-Za-z0-9_.\-]+)==([^\s#]+)", text, flags=re.M)
    return {name.lower(): version for name, version in found}


def test_requirements_and_environment_agree():
    req = pins((ROOT / "requirements.txt").read_text())
    env = pins((ROOT / "environment.yml").read_text())
    assert req == env and {"torch", "torchvision", "mlxtend", "tqdm"} <= set(req)
    assert req["torch"] == "2.14.1" and req["torchvision"] == "0.29.1"


def test_every_requirement_says_who_needs_it():
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if "==" in line:
            assert "#" in line and len(line.split("#", 1)[1].strip()) > 5, line


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert "make test" in (ROOT / "README.md").read_text()
