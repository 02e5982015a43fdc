"""The package's architecture as pyproject.toml declares it: subpackages in layers, no import
cycles at any level (import-linter's contracts)."""
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert lint, "import-linter is part of the test dependencies: pip install -e '.[test]'"
    result = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_every_subpackage_says_what_lives_there():
    for init in sorted((ROOT / "nbutils").glob("*/__init__.py")):
        text = init.read_text()
        assert text.startswith('"""') and len(text.split('"""')[1].split()) >= 15, f"{init} needs its docstring"
