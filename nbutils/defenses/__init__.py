"""Cleaning poisoned search data before the search: ``defending`` holds the defence config and
``defend``, the one call behind ``sanitisation`` (loss-based), ``relabelling`` (clusters) and
``denoising`` (diffusion)."""
