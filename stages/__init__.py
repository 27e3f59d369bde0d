"""One module per pipeline stage; each is also its own executable (`mmar-tokenize`, ...)."""
