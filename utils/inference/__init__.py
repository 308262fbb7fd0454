"""Inference: loading anything the suite writes, the decoding engine and its forward runners."""
