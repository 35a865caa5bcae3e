"""Drop-ins that put ``motab_kernels.fused_linear_divergence`` into trainers users already run."""
