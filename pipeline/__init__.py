"""One-step, 1-bit image generators distilled from pretrained diffusion models through offline teacher data."""
