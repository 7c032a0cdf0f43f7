"""Where the activations come from: the model (one resolver of its source), the corpus, capture, the store."""
