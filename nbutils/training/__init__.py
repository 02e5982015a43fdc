"""Training networks from scratch: retraining a found architecture on clean data and testing it
(``train``), and CLF's surrogate ResNet-18 (``surrogate``)."""
