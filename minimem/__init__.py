"""minimem: memory layers for language models, from product keys to UltraMemV2.

One module per idea: ``model`` (the GPT), ``moe``, ``retrieval`` (product keys, TDQKR),
``kernels`` (the fused memory lookup, torch and Triton), ``memory`` (PKM, PEER, UltraMem,
UltraMemV2), ``data``, ``train``, ``accounting``.
"""
__version__ = "0.1.0"
