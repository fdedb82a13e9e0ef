"""LoRA adapters: PEFT adapter folders read as fine-tunes."""

from engine.lora.adapter import LoraAdapter, is_adapter_folder

__all__ = ["LoraAdapter", "is_adapter_folder"]
