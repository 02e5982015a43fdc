"""From parameter files to artifacts: ``params`` validates the YAML files, ``runner`` expands
a preset into stages and runs them (in order, or on Dask through ``cluster``), ``steps`` is the
step behind each notebook, ``code_versions`` the version of each stage kind's code in its key."""
