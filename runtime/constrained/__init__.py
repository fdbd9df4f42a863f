"""Structured generation: grammar backends (outlines, xgrammar) behind one matcher interface,
a compile cache that runs off the scheduler loop, batched token masks, and jump-forward."""
