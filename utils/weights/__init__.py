"""Weights on disk: model folders and configs, safetensors shards read and written tensor by tensor, LoRA merge maths, format conversions, export planning, a layer-by-layer verification forward."""
