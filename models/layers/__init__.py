"""Building blocks shared by every model family (attention, MLP, embeddings, norms, ...)."""
