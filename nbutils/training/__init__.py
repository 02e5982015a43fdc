"""Training networks from scratch: the one supervised training loop (``loop``) and what it runs
with (``recipe``: the loop's recipe and the SGD settings the configs share), retraining a found
architecture on clean data and testing it (``train``), and the small-image ResNet-18 of CLF's
surrogate and the sanitisation defender (``surrogate``)."""
