"""nlgkd: knowledge distillation of text generators into small encoder-decoders."""

__version__ = "0.1.0"
