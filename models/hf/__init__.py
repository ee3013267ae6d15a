"""Hugging Face checkpoints in and out, with exact parity with transformers.

    from models import hf
    model = hf.load("/path/to/snapshot")           # Llama, Mistral, Qwen 2 / 3, Gemma 2 / 3,
    logits, _ = model(tokens)                      # ModernBERT (MLM)
    hf.save(model, "/tmp/out")                     # transformers' from_pretrained reads it

Families register in `models.hf.family` (one module each: llama, qwen, gemma, modernbert);
`hf.supported()` lists the architectures. See models/hf/README.md for what maps to what.
Needs `safetensors` (the `hf` extra); nothing is downloaded.
"""

from models.hf import gemma, llama, modernbert, qwen  # register the families
from models.hf.api import load, read_config, save
from models.hf.family import Family, register, supported

__all__ = ["Family", "load", "read_config", "register", "save", "supported"]
