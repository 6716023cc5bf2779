"""E-LatentLPIPS training: the latent perceptual network on BAPPS-style triplets or images, and its calibration."""
