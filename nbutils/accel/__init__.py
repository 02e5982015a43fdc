"""The DARTS supernet and evaluation network computed faster on the CPU, as the same functions
with the same parameters (``fast_supernet``, ``fast_network``; ``supernet_choice`` says where
the fast supernet runs), built from shared pieces: channels_last layouts and dense gradients
(``channels_last``), depthwise convolutions (``depthwise``), batch norms with their 1x1
convolutions and running statistics (``batch_norm``) and the DARTS operations made of them
(``operations``); and the C kernels beneath them (``channels_last_kernels``, compiled on first
use, PyTorch's kernels without a compiler)."""
