"""nbutils: the engine behind the notebooks that audit neural architecture search against data poisoning.

Subpackages by role, each importing only from the ones listed below it (``make test`` checks
this with import-linter, see ``[tool.importlinter]`` in pyproject.toml):

    report     tables, statistics and figures of the HTML report (reads artifacts, never trains)
    pipeline   parameter files, stages, their execution by papermill and Dask, the step behind
               each notebook, the command line
    studies    analyses beside the main audit: the metric sensitivity of TMLR Table 2
    defenses   cleaning poisoned search data: sanitisation, relabelling, denoising
    attacks    poisoning the search data: label flipping, noise, gradient canceling, alpha attack
    nas        the NAS algorithms (DARTS, P-DARTS, TE-NAS, RoBoT, NSGANetV2) and their metrics
    training   training networks from scratch: retraining, CLF's surrogate ResNet-18
    accel      the DARTS supernet computed faster on the CPU (same function), with its C kernels
    space      the DARTS search space: operations, genotypes, the supernet and the evaluation network
    core       datasets, poison sets, the artifact store, devices, progress, memory settings

A newcomer reads ``pipeline/runner.py`` (what a run does), then ``pipeline/steps.py`` (the
step behind each notebook), then the subpackage of the change at hand.
"""

__version__ = "0.1.0"
