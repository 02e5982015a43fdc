"""The warm kernel: each notebook starts as in a fresh kernel (namespace, execution counter,
working directory, environment, warnings), computes the same results as in a fresh kernel,
and a notebook that fails or leaves the kernel changed is followed by a fresh kernel."""
import json
import os
from pathlib import Path

import nbformat
import pytest
import torch

from nbutils.pipeline import execution, warm_kernel
from nbutils.pipeline.code_versions import NOTEBOOK_OF, NOTEBOOKS
from nbutils.pipeline.params import load_preset
from nbutils.pipeline.stages import expand
from nbutils.space.genotype import random_genotype

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "presets" / "tiny"

DIRTY = '''
import os, warnings
import nbutils.core.datasets
secret = 42
os.environ["NBUTILS_TEST_LEFTOVER"] = "1"
os.chdir("/")
warnings.simplefilter("ignore")
os.write(2, b"first notebook's kernel output\\n")
'''

INSPECT = '''
import os, sys, warnings
state = {"names": sorted(k for k in globals() if not k.startswith("_") and k not in ("In", "Out", "exit", "quit", "get_ipython", "open")),
         "leftover": os.environ.get("NBUTILS_TEST_LEFTOVER"), "cwd": os.getcwd(), "pid": os.getpid(),
         "warning filters": repr(warnings.filters), "path": sys.path}
print(json.dumps(state))
'''


def notebook(folder: Path, name: str, *cells: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("value = None"), *(nbformat.v4.new_code_cell(c) for c in cells)]
    nb.cells[0].metadata["tags"] = ["parameters"]
    nb.metadata.kernelspec = {"name": execution.kernel_name(), "display_name": "kernel", "language": "python"}
    path = folder / f"{name}.ipynb"
    nbformat.write(nb, path)
    return path


def printed(path: Path) -> dict:
    nb = json.loads(path.read_text())
    return json.loads(nb["cells"][-1]["outputs"][0]["text"] if isinstance(nb["cells"][-1]["outputs"][0]["text"], str)
                      else "".join(nb["cells"][-1]["outputs"][0]["text"]))


@pytest.fixture
def kernel(tmp_path):
    k = warm_kernel.WarmKernel(execution.kernel_name(), tmp_path)
    yield k
    k.close()


def test_reused_kernel_starts_each_notebook_clean(kernel, tmp_path):
    """What a notebook sees in a reused kernel is what the first notebook saw in it."""
    dirty = notebook(tmp_path, "dirty", DIRTY)
    inspect = notebook(tmp_path, "inspect", "import json", INSPECT)
    kernel.execute(inspect, tmp_path / "out0.ipynb", {"value": 0}, kernel_log=tmp_path / "log0")
    kernel.execute(dirty, tmp_path / "out1.ipynb", {"value": 1}, kernel_log=tmp_path / "log1")
    kernel.execute(inspect, tmp_path / "out2.ipynb", {"value": 2}, kernel_log=tmp_path / "log2")
    first, state = printed(tmp_path / "out0.ipynb"), printed(tmp_path / "out2.ipynb")
    assert kernel.started == 1 and state == first                  # the same kernel, in the same state
    assert state["names"] == ["json", "os", "sys", "value", "warnings"]   # not "secret"
    assert state["leftover"] is None and state["cwd"] == str(tmp_path)
    counts = [c["execution_count"] for c in json.loads((tmp_path / "out2.ipynb").read_text())["cells"]]
    assert counts == [1, 2, 3, 4]   # the injected parameters cell included, numbered as in a fresh kernel
    # each execution's share of what the kernel process printed itself
    assert "first notebook's kernel output" in (tmp_path / "log1").read_text()
    assert not (tmp_path / "log2").exists()


def test_failed_notebook_is_followed_by_a_fresh_kernel(kernel, tmp_path):
    failing = notebook(tmp_path, "failing", "leftover = 1", "raise ValueError('injected')")
    inspect = notebook(tmp_path, "inspect", "import json", INSPECT)
    kernel.execute(inspect, tmp_path / "out0.ipynb", {})
    first = kernel.pid
    with pytest.raises(Exception, match="injected"):
        kernel.execute(failing, tmp_path / "out1.ipynb", {})
    assert kernel.pid is None   # dropped at once
    kernel.execute(inspect, tmp_path / "out2.ipynb", {})
    state = printed(tmp_path / "out2.ipynb")
    assert state["pid"] != first and kernel.started == 2 and state["names"] == ["json", "os", "sys", "value", "warnings"]


@pytest.mark.parametrize("change, reason", [
    ("import nbutils.pipeline.batches as b; b.run_trials = print", "nbutils.pipeline.batches.run_trials rebound"),
    ("import nbutils.space.network as n; n.EvalNetwork.forward = print", "nbutils.space.network.EvalNetwork.forward rebound"),
    ("import torch; torch.set_default_dtype(torch.float64)", "torch default dtype"),
])
def test_kernel_left_changed_is_replaced(kernel, tmp_path, change, reason):
    """A notebook that succeeds but patches the project or changes torch's global settings
    would change what the next notebook computes: the next one gets a fresh kernel, and its
    kernel.log says why."""
    patching = notebook(tmp_path, "patching", change)
    inspect = notebook(tmp_path, "inspect", "import json", INSPECT)
    kernel.execute(patching, tmp_path / "out1.ipynb", {})
    first = kernel.pid
    kernel.execute(inspect, tmp_path / "out2.ipynb", {}, kernel_log=tmp_path / "log2")
    assert printed(tmp_path / "out2.ipynb")["pid"] != first
    assert reason in (tmp_path / "log2").read_text()


def test_same_results_as_a_fresh_kernel(tmp_path):
    """The retrain notebook of the tiny preset, in a fresh kernel and in a warm kernel that first
    ran another retraining: the same accuracy, curve and weights, bit for bit."""
    retrain = next(s for s in expand(load_preset(TINY)) if s.kind == "retrain")
    search = tmp_path / "search"
    search.mkdir()
    (search / "genotype.json").write_text(json.dumps(random_genotype(__import__("numpy").random.default_rng(3)).to_dict()))

    def trial(name, seed):
        out = tmp_path / name
        out.mkdir()
        return {"spec": {**retrain.spec, "seed": seed}, "inputs": {"search": str(search)}, "out_dir": str(out)}

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    source = NOTEBOOKS / NOTEBOOK_OF["retrain"]
    import papermill

    papermill.execute_notebook(str(source), str(tmp_path / "fresh.ipynb"), parameters={"trials": [trial("fresh", 0)]},
                               kernel_name=execution.kernel_name(), cwd=str(NOTEBOOKS), progress_bar=False)
    kernel = warm_kernel.WarmKernel(execution.kernel_name(), NOTEBOOKS)
    try:
        kernel.execute(source, tmp_path / "other.ipynb", {"trials": [trial("other", 5)]})
        kernel.execute(source, tmp_path / "warm.ipynb", {"trials": [trial("warm", 0)]})
        assert kernel.started == 1
    finally:
        kernel.close()
    fresh, warm = (json.loads((tmp_path / n / "result.json").read_text()) for n in ("fresh", "warm"))
    other = json.loads((tmp_path / "other" / "result.json").read_text())
    for result in (fresh, warm, other):
        result.pop("seconds")
        for row in result["curve"]:
            row.pop("seconds", None)
    assert warm == fresh and other != fresh
    weights = [torch.load(tmp_path / n / "weights.pt", weights_only=True) for n in ("fresh", "warm")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
