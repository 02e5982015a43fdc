"""The DARTS supernet computed faster on the CPU, as the same function with the same parameters
(``fast_supernet``; ``supernet_choice`` says where it runs), and its training-mode batch-norm
kernels in C (``channels_last_kernels``, compiled on first use, PyTorch's kernels without a
compiler)."""
