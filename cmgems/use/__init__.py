"""Using a model: sequences or genome regions in (genome, windows), embeddings (embed), class
predictions (predict) and variant effect scores (variants) out."""
