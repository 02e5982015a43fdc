"""The DARTS search space: candidate operations (``ops``), discrete architectures
(``genotype``) and their integer encoding (``encoding``), the search supernet weighted by alpha
(``supernet``) and the evaluation network built from a genotype (``network``)."""
