"""Inside a warm kernel (:mod:`nbutils.pipeline.warm_kernel`): put it back into the state a fresh
kernel starts in between two notebooks, and say when that cannot be vouched for.

A notebook executed in a kernel that already ran another one must compute exactly what it
would compute in a fresh kernel. Modules stay imported (that is the point: importing torch and
the project is what a fresh kernel costs), so what a notebook can leave behind is divided in two:

* state that is **restored** before every notebook: the user namespace and the execution
  counter (IPython's ``reset`` with a new session, so the executed notebook numbers its cells
  from 1), the working directory, the environment, ``sys.path``, the warning filters and the
  "already shown" registries (a warning is shown in every notebook that triggers it, as in a
  fresh kernel), matplotlib's ``rcParams`` and pyplot's open figures;
* state that is **checked**: the global settings of torch that change results (default dtype,
  threads, grad mode, deterministic algorithms, the CPU backends' switches), and every module
  attribute and class attribute of the project's modules (a notebook that patches
  ``steps.retrain`` or a method would change what the next one computes). When one differs
  from the kernel's start, :func:`restore` names it and the runner starts a fresh kernel.

The step functions seed every random generator they use (``seed_everything``), so the global
generators need no restoring. Caches of pure functions (the loaded datasets) are kept: they
return what a fresh kernel would load.

Light on purpose: it is imported into the kernel before anything else, and reads torch and
matplotlib only when a notebook has imported them.
"""
from __future__ import annotations

import os
import sys
import warnings

from IPython import get_ipython

PROJECT_PACKAGE = "nbutils"

_start: dict = {}            # the kernel's state when recorded: what restore() returns to
_attributes: dict = {}       # module name -> {attribute: id} of the project's modules, as first seen


def _torch_settings() -> dict:
    torch = sys.modules.get("torch")
    if torch is None:
        return {}
    backends = torch.backends
    return {
        "default dtype": torch.get_default_dtype(),
        "threads": torch.get_num_threads(),
        "interop threads": torch.get_num_interop_threads(),
        "grad enabled": torch.is_grad_enabled(),
        "deterministic algorithms": torch.are_deterministic_algorithms_enabled(),
        "mkldnn enabled": backends.mkldnn.enabled,
        "cudnn enabled": backends.cudnn.enabled,
        "cudnn benchmark": backends.cudnn.benchmark,
        "cudnn deterministic": backends.cudnn.deterministic,
        "float32 matmul precision": torch.get_float32_matmul_precision(),
        "anomaly detection": torch.is_anomaly_enabled(),
    }


def _project_attributes(module) -> dict[str, int]:
    """``id`` of every global of a project module, and of every attribute of the classes it defines."""
    found = {}
    for name, value in list(vars(module).items()):
        found[name] = id(value)
        # issubclass(type(...)), not isinstance: isinstance also asks the value for its __class__,
        # which imports a module declared with lazy_loader (and changes the kernel's state)
        if issubclass(type(value), type) and value.__module__ == module.__name__:
            for attribute, member in list(vars(value).items()):
                found[f"{name}.{attribute}"] = id(member)
    return found


def _note_project_modules() -> list[str]:
    """Record the project modules imported since the last call; name every attribute of an
    already recorded one that was rebound since."""
    changed = []
    for name, module in list(sys.modules.items()):
        if module is None or name == __name__ or not (name == PROJECT_PACKAGE or name.startswith(PROJECT_PACKAGE + ".")):
            continue
        now = _project_attributes(module)
        before = _attributes.setdefault(name, now)
        if before is not now:
            changed += [f"{name}.{attribute}" for attribute, ident in before.items() if now.get(attribute) != ident]
    return changed


def record() -> None:
    """The kernel's state now, as the state every notebook starts in (call once, at start-up,
    after importing what the notebooks import)."""
    _start.clear()
    _start.update(cwd=os.getcwd(), environ=dict(os.environ), path=list(sys.path),
                  warning_filters=list(warnings.filters), torch=_torch_settings(), rc=_rc_params())
    _attributes.clear()
    _note_project_modules()


def _rc_params() -> dict | None:
    matplotlib = sys.modules.get("matplotlib")
    return dict(matplotlib.rcParams) if matplotlib is not None else None


def restore() -> list[str]:
    """Return the kernel to its recorded state (see the module docstring); the state that could
    not be restored and differs, as readable names (empty: the kernel is as good as fresh)."""
    if not _start:
        return ["the kernel's start state was never recorded"]
    ipython = get_ipython()
    if ipython is not None:
        ipython.reset(new_session=True)
    os.chdir(_start["cwd"])
    os.environ.clear()
    os.environ.update(_start["environ"])
    sys.path[:] = _start["path"]
    warnings.filters[:] = _start["warning_filters"]
    warnings._filters_mutated()   # every module's "already warned" registry is stale: warn again
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close("all")
    matplotlib = sys.modules.get("matplotlib")
    if matplotlib is not None:
        if _start["rc"] is None:   # imported by a notebook: its defaults are the state to return to
            _start["rc"] = _rc_params()
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # deprecated keys are in rcParams too
                matplotlib.rcParams.update(_start["rc"])
    problems = [f"{name} rebound" for name in _note_project_modules()]
    torch_now = _torch_settings()
    if torch_now and not _start["torch"]:
        _start["torch"] = torch_now   # first imported by a notebook: a fresh import's settings
    problems += [f"torch {name}: {_start['torch'][name]!r} -> {value!r}"
                 for name, value in torch_now.items() if _start["torch"].get(name) != value]
    return problems
