"""The report, from artifacts only: ``tables`` (the papers' tables, the CSV files, the trial
listing), ``stats`` (Welch tests, Benjamini-Hochberg, dImp, power), ``figures`` (cell diagrams)
and ``poison_figures`` (poisons beside their clean images)."""
