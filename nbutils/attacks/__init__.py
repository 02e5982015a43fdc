"""Poisoning the search data: ``poisoning`` holds the attack config and ``poison``, the one call
behind every attack, with random label flipping and Gaussian noise; ``confidence_flip`` is CLF
(label flips chosen from a surrogate's confidence); the crafted attacks are
``gradient_canceling`` (generic and NAS-specific) and ``alpha_attack`` (the workshop paper's),
both optimising their perturbations with ``perturbation``."""
