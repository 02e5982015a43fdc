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
    zero_cost   the six training-free metrics RoBoT uses
    ntk         NTK condition number and linear regions (TE-NAS)
    train       retraining a network from scratch and evaluating it
    attacks     poisoning attacks behind one call, ``poison``
    surrogate, gradient_canceling, alpha_attack, diff_augment, poison_figures
                crafted attacks (CLF, GC, the workshop alpha-gradient attack) and their figures
    poison_set  poison sets on disk
    stats       accuracy summaries, dImp, Welch tests, Benjamini-Hochberg
    params      YAML parameter files validated into typed specs
    store       the artifact store (content-addressed, atomic)
    runner      preset -> stages -> papermill executions -> summary
    report      tables and cell diagrams for the HTML report
"""

__version__ = "0.1.0"
