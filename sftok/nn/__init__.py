"""Neural-network building blocks shared by the encoder and the decoder."""
from sftok.nn.vit import Attention, Block, Transformer

__all__ = ["Attention", "Block", "Transformer"]
