"""Turning a model reference (HF directory, .gguf file, alias) into weights, hyper-parameters and a tokenizer."""
