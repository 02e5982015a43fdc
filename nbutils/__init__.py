"""nbutils: the engine behind the notebooks that audit neural architecture search against data poisoning.

One module per concept:
    data        datasets, splits, subsets, batches and the poisoned view
    ops         the DARTS candidate operations
    genotype    discrete architectures: parse, derive from alpha, sample, draw
    supernet    the DARTS search network (mixed operations weighted by alpha)
    network     the evaluation network built from a genotype
    darts       DARTS search (first and second order, and anti-search)
    pdarts      P-DARTS: progressive search in three stages
    fast_supernet  the same supernet function, computed faster
    tenas       TE-NAS: training-free pruning search by NTK condition number and linear regions
    robot       RoBoT: Bayesian optimisation over weighted training-free metrics
    nsganetv2   NSGANetV2 on the DARTS space; with encoding (genotype <-> integer vector),
                accuracy_predictors (RBF, GP, CART, adaptive) and one_shot (weight-sharing supernet)
    zero_cost   the six training-free metrics RoBoT uses
    metric_sensitivity  how much each metric moves under poisoning (TMLR Table 2)
    ntk         NTK condition number and linear regions (TE-NAS)
    train       retraining a network from scratch and evaluating it
    attacks     poisoning attacks behind one call, ``poison``
    surrogate, gradient_canceling, alpha_attack, diff_augment, poison_figures
                crafted attacks (CLF, GC, the workshop alpha-gradient attack) and their figures
    poison_set  poison sets on disk
    defenses    defences behind one call, ``defend``: sanitisation, relabelling, denoising
    stats       accuracy summaries, dImp, Welch tests, Benjamini-Hochberg
    params      YAML parameter files validated into typed specs
    store       the artifact store (content-addressed, atomic)
    runner      preset -> stages -> papermill executions -> summary
    cluster     running the stages on Dask (local or an existing cluster)
    steps       the step behind each notebook
    report      tables and cell diagrams for the HTML report
"""

__version__ = "0.1.0"
