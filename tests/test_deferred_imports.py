"""The heavy dependencies are declared at the top of their modules but imported on first use
(lazy_loader, nbutils/core/deferred_imports.py): the CLI and the notebooks' imports must not
load them, and a declared module must work when it is used."""
import subprocess
import sys

HEAVY = ("torchvision", "sklearn", "scipy.stats", "scipy.spatial", "papermill", "nbconvert", "diffusers", "bayes_opt",
         "pymoo.optimize", "pandas", "jupyter_client", "distributed")


def test_the_cli_and_the_steps_load_no_heavy_dependency_at_start_up():
    """What `python -m nbutils` and every stage notebook import (the report notebook needs
    SciPy's statistics, and imports them)."""
    code = f"""
import sys, types
import nbutils.__main__, nbutils.pipeline.steps
loaded = [m for m in {HEAVY!r} if isinstance(sys.modules.get(m), types.ModuleType)
          and type(sys.modules[m]).__name__ != "_LazyModule"]
print(",".join(loaded))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"imported at start-up: {out}"


def test_a_declared_module_loads_when_used():
    from nbutils.defenses import relabelling
    from nbutils.nas import accuracy_predictors

    mapping = relabelling.best_matching([0, 1, 1], [1, 0, 0], 2)   # scipy.optimize, loaded here
    assert list(mapping) == [1, 0]
    assert accuracy_predictors.kendall_tau([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == 1.0
