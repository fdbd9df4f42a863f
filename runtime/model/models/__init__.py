"""One file per model family; `registry.py` maps an HF `architectures` name to its class."""
