"""The models: architectures, the DNA tokenizer that travels in every export, the model card."""
