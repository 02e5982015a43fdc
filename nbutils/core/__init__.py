"""What every other part stands on: the in-memory dataset and its subsets and splits
(``image_dataset``), the named datasets read from disk (``datasets``), batches (``batches``),
poison sets on disk (``poison_set``), the content-addressed artifact store (``store``), device
choice and seeding (``device``), progress bars (``progress``), glibc's memory settings
(``malloc``), the differentiable augmentation the attacks craft through (``diff_augment``) and
the configs (``config``): how every engine's settings are declared and checked."""
