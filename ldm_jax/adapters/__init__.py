"""Adapters: LoRA (`lora.py`) and textual inversion (`textual_inversion.py`) as pure functions over params."""
