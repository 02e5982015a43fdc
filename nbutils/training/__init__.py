"""Training networks from scratch: the one supervised training loop (``loop``), retraining a
found architecture on clean data and testing it (``train``), and the small-image ResNet-18 of
CLF's surrogate and the sanitisation defender (``surrogate``)."""
