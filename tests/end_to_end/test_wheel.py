"""The wheel holds every module and data file, and bsym works when installed from it.

The wheel is installed into a fresh virtual environment that borrows the heavy dependencies
(torch, uproot...) from this one through a ``.pth`` file: a directory named by a ``.pth``
file is only put on ``sys.path``, its own ``.pth`` files are not run, so the editable install
of the checkout cannot shadow the wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# where each source folder lands in the wheel (pyproject's package-dir)
PACKAGE_DIRS = {
    "bsym": "bsym",
    "training": "bsym/training",
    "export": "bsym/export",
    "serving": "bsym/serving",
}
OFFLINE = ("--no-deps", "--no-index", "--quiet")
STUDIES = ("learning-curve", "augmentation", "isolation", "efp-search")


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    work: Path

    def run(self, *args: str) -> str:
        """Run a command of the fresh environment from a folder outside the checkout."""
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV"}
        }
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONNOUSERSITE"] = "1"
        return run_checked([str(self.venv / "bin" / args[0]), *args[1:]], self.work, env=env)

    def python(self, code: str) -> str:
        return self.run("python", "-c", code).strip()


def run_checked(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command}: {done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("wheel")
    source = base / "source"
    for folder in PACKAGE_DIRS:
        shutil.copytree(
            ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    run_checked(
        [*pip, "wheel", *OFFLINE, "--no-build-isolation", "-w", str(base / "dist"), str(source)],
        base,
    )
    (wheel,) = (base / "dist").glob("bsym-*.whl")
    environment = base / "venv"
    venv.EnvBuilder(with_pip=False).create(environment)
    run_checked(
        [*pip, "--python", str(environment / "bin" / "python"), "install", *OFFLINE, str(wheel)],
        base,
    )
    borrowed = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    fresh = Installed(wheel, environment, base / "work")
    fresh.work.mkdir()
    site = Path(fresh.python("import sysconfig; print(sysconfig.get_path('purelib'))"))
    (site / "bsym-test-dependencies.pth").write_text("\n".join(sorted(borrowed)) + "\n")
    return fresh


def expected_files() -> set[str]:
    """Every module of the checkout, the shipped configs and the typing marker, as wheel paths."""
    files = {"bsym/py.typed"}
    for folder, package in PACKAGE_DIRS.items():
        for path in (ROOT / folder).rglob("*"):
            if "__pycache__" in path.parts or not path.is_file():
                continue
            relative = path.relative_to(ROOT / folder).as_posix()
            if path.suffix == ".py" or (relative.startswith("configs/") and path.suffix == ".yaml"):
                files.add(f"{package}/{relative}")
    return files


def test_wheel_holds_every_module_config_and_package(installed: Installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    expected = expected_files()
    assert {"bsym/configs/isolation_pfn.yaml", "bsym/serving/triton_backend/model.py"} <= expected
    assert {"bsym/training/models/registry.py", "bsym/training/studies/cli.py"} <= expected
    assert sorted(expected - names) == []
    packages = {name.rsplit("/", 1)[0] for name in expected if name.endswith(".py")}
    assert {"bsym/training/models", "bsym/training/studies", "bsym/simulate"} <= packages
    missing_init = sorted(p for p in packages if f"{p}/__init__.py" not in names)
    assert missing_init == [], "every subpackage needs an __init__.py"


def test_installed_commands_answer_help(installed: Installed) -> None:
    assert "simulate" in installed.run("bsym", "--help")
    for study in STUDIES:
        assert "--quick" in installed.run("bsym", "study", study, "--quick", "--help")
    where = installed.python(
        "import bsym, bsym.training.studies.cli as cli; print(bsym.__file__); print(cli.__file__)"
    )
    for path in where.splitlines():
        assert Path(path).is_relative_to(installed.venv), path


def test_installed_simulation_and_shipped_config_train(installed: Installed) -> None:
    data = installed.work / "data"
    installed.run("bsym", "simulate", "isolation", "--events", "300", "--out", str(data))
    assert sorted(p.name for p in data.iterdir()) == [
        "isolation_events_000.root",
        "isolation_muons_000.root",
    ]
    config = Path(
        installed.python(
            "from bsym.configs import shipped_config; print(shipped_config('isolation_pfn'))"
        )
    )
    assert config.is_file()
    assert config.is_relative_to(installed.venv)
    assert not config.is_relative_to(ROOT)
    run = installed.work / "run"
    out = installed.run(
        "bsym",
        "train",
        str(config),
        "--set",
        f"data.train=[{data}/isolation_muons_*.root]",
        "--set",
        "optimizer.epochs=1",
        "--set",
        "optimizer.batch_size=4096",
        "--set",
        f"output_dir={run}",
    )
    assert "finished after 1 epoch" in out
    assert {"checkpoint.pt", "last.pt", "config.yaml"} <= {p.name for p in run.iterdir()}
