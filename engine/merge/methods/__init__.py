"""One module per merge method; engine.merge.registry lists them."""
