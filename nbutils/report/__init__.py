"""The report, from artifacts only: ``results`` (the rows read from the artifacts, trials.csv),
``table_cells`` (each table cell's statistics, cells.csv, the findings in words), ``stats``
(Welch tests, Benjamini-Hochberg, dImp, power), ``names`` (the papers' names of attacks,
algorithms and conditions), ``tables`` (the papers' tables and the trial listing as HTML),
``figures`` (cell diagrams), ``charts`` (accuracy and Pareto charts), ``poison_figures``
(poisons beside their clean images), ``trajectories`` (the searches epoch by epoch),
``lessons`` (what the notebooks show as lessons), ``departures`` and ``environment``."""
