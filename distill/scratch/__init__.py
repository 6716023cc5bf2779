"""From scratch: a text-to-image GAN trained on image–caption data (its data, loss phases and parts)."""
