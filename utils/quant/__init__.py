"""Quantization: the min-max grid GPTQ and RTN share (``grid``), GPTQ itself (``gptq``), the classic GPTQ checkpoint
layout the ecosystem loads (``packing``: ``qweight`` / ``qzeros`` / ``scales`` / ``g_idx`` and
``quantize_config.json``), the seeds' own quantizers kept as baselines (``baselines``: ChatGLM's per-row absmax
int8/int4, LLMZoo's group-wise compression), GPTQ over a whole model block by block (``calibrate``), and the
dequantize-matmul kernels that run the packed layout (``kernels``: triton on GPUs, torch's own int4 kernel on the
CPU, a dequantize-then-matmul fallback), the seeds' formats as checkpoints (``rowwise``), every quantized folder
read back into a model (``checkpoint``), and a model streamed from disk one decoder block at a time
(``streaming``), pre-quantized bitsandbytes folders (``bnb``), llama.cpp files (``gguf``) and LoRA on
GPTQ layers (``adapters``)."""
