"""A small Open-Sora-architecture model trained on synthetic captioned shape videos, and its judge.

``dataset`` generates the clips, ``train`` trains the VAE, T5 tokenizer and STDiT3 of the same code as the
full-size models, ``judge`` scores decoded videos without networks, ``weights/`` holds the shipped result.
"""
