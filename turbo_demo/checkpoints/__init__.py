"""Checkpoint directories and files: what a directory declares (config.py), the memory a load
needs (memory.py), loading (checkpoint.py, quantized.py: the block format on disk), the hub
(hub.py), generation settings (generation.py), and the files other engines read (gguf_export.py,
gguf_vocab.py for llama.cpp; powerinfer.py, powerinfer_gguf.py for PowerInfer). It sits above
models/ and runtime/: a quantized load packs through the runtime.
"""
