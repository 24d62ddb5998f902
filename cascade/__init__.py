"""Stable Cascade (Würstchen v3) engine: loads single-file checkpoints offline and samples them ComfyUI-exactly.

Knows torch, safetensors, diffusers and transformers; knows nothing of SD.Next.
"""

__version__ = "0.1.0"
