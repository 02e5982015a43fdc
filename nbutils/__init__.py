"""nbutils: the engine behind the notebooks that audit neural architecture search against data poisoning.

One module per concept:
    data        datasets, splits, subsets, batches and the poisoned view
    ops         the DARTS candidate operations
    genotype    discrete architectures: parse, derive from alpha, sample, draw
    supernet    the DARTS search network (mixed operations weighted by alpha)
    network     the evaluation network built from a genotype
    darts       DARTS search (and anti-search)
    train       retraining a network from scratch and evaluating it
    attacks     poisoning attacks behind one call, ``poison``
    poison_set  poison sets on disk
    stats       accuracy summaries, dImp, Welch tests, Benjamini-Hochberg
    params      YAML parameter files validated into typed specs
    store       the artifact store (content-addressed, atomic)
    runner      preset -> stages -> papermill executions -> summary
    report      tables and cell diagrams for the HTML report
"""

__version__ = "0.1.0"
