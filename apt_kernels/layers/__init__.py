"""nn.Module layers built on the apt_kernels ops (imported by module path, e.g. apt_kernels.layers.moe)."""
