"""One module per compressor; engine.compress.registry lists them."""
