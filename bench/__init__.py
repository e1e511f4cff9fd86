"""Benchmarks: `specrelay bench spec|bus|relay|tir`, one module each, every one running ours and the baselines side
by side in one process (the kernels have their own: `specrelay kernels bench`). They sit outside `services/`: a
benchmark drives several services at once, and the services never import it."""
