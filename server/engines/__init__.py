"""Inference engines behind one interface: llama.cpp (CPU default) and vLLM (GPU, or CPU)."""
