"""Model files: where a model comes from (`store`: names, PyPI packages, local paths, GGUF
conversion, the cache) and how it is loaded onto a device (`loading`)."""
