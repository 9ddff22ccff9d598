"""``bsym --help`` and every ``bsym <stage> --help`` answer without importing a heavy package."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = (
    "numpy",
    "awkward",
    "uproot",
    "torch",
    "onnx",
    "onnxruntime",
    "tritonclient",
    "scipy",
    "matplotlib",
    "yaml",
    "tqdm",
)

# Runs in a fresh interpreter: this process has imported everything already.
SCRIPT = """
import contextlib, io, json, sys

import typer

from bsym.cli import app

root = typer.main.get_command(app)


def walk(command, path):
    yield path
    for name, sub in getattr(command, "commands", {}).items():
        yield from walk(sub, [*path, name])


helps = {}
for path in walk(root, []):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            root.main([*path, "--help"], prog_name="bsym")
        except SystemExit as stop:
            code = stop.code
    helps[" ".join(path)] = {"code": code, "usage": "Usage" in out.getvalue()}
print(json.dumps({"helps": helps, "modules": sorted(sys.modules)}))
"""


def test_help_of_every_command_imports_no_heavy_package() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, timeout=120
    )
    report = json.loads(done.stdout)
    helps = report["helps"]
    for stage in ("", "train", "evaluate", "export", "score", "serve", "simulate", "study"):
        assert stage in helps
    assert {"simulate isolation", "simulate lorentz", "simulate calo-rotation"} <= set(helps)
    assert "simulate flavour" in helps
    assert {"study learning-curve", "study augmentation", "study isolation"} <= set(helps)
    for command, answer in helps.items():
        assert answer == {"code": 0, "usage": True}, command
    loaded = {name.split(".")[0] for name in report["modules"]}
    assert loaded.isdisjoint(HEAVY), sorted(loaded & set(HEAVY))
