"""Quantization: the min-max grid GPTQ and RTN share (``grid``), GPTQ itself (``gptq``), the classic GPTQ checkpoint
layout the ecosystem loads (``packing``: ``qweight`` / ``qzeros`` / ``scales`` / ``g_idx`` and
``quantize_config.json``), the seeds' own quantizers kept as baselines (``baselines``: ChatGLM's per-row absmax
int8/int4, LLMZoo's group-wise compression), and the dequantize-matmul kernels that run the packed layout (triton,
with a torch fallback)."""
