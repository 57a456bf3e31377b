"""Open-Sora v1.2 text-to-video: STDiT3, the VAE, the T5 text encoder and their checkpoint loading."""
