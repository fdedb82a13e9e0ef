"""The file names of a Hugging Face style model folder, defined once for reader and writer."""

CONFIG_NAME = "config.json"
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
MANIFEST_NAME = "delta_workbench_manifest.json"


def shard_name(index: int, count: int) -> str:
    """Hugging Face shard naming: model-00001-of-00003.safetensors (1-based)."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"
