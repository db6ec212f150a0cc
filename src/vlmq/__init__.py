"""vlmq: W8A8 INT8 SmoothQuant for vision-language models with NVIDIA ModelOpt."""

__version__ = "0.1.0"
