"""Storage and runtime for the seeds' own quantizers: ChatGLM's per-row absmax int8 / int4 (``chatglm_rowwise``)
and LLMZoo's group-wise compression (``llmzoo_groupwise``). The arithmetic is ``utils.quant.baselines``'; this
module gives it a checkpoint layout, a ``quantization_config`` for ``config.json`` and the modules that run it.

Per quantized linear layer ``name`` (W is [out, in]) the checkpoint holds:

* ChatGLM: ``name.weight`` int8 [out, in] (8 bits) or [out, in / 2] (4 bits, two codes a byte, the even column in
  the high nibble) and ``name.weight_scale`` float16 [out] — the names ChatGLM-6B's ``QuantizedLinear`` uses.
* LLMZoo: ``name.weight`` codes with the weight's own shape [out, in], one per byte (int8 symmetric, uint8
  asymmetric), ``name.weight_scale`` float32 (LLMZoo's multiplier ``B / range``, one per group) and, asymmetric
  only, ``name.weight_mn`` float32 (the group minimum). With ``group_dim`` 1 the groups run along the input
  columns and scale / mn are [out, groups]; with ``group_dim`` 0 along the output rows, [groups, in]. LLMZoo keeps
  its codes zero-padded to whole groups with a size-1 axis on the scale; both are left out here, since the padding
  is cut off at decompression anyway (so a 64-wide layer at group 256 stores 64 codes a row, not 256), and
  ``GroupwiseWeight.dequantize`` restores them before calling ``groupwise_decompress``. The scale stays float32:
  LLMZoo's multiplier is the inverse of a step, and a group whose absmax is below 127 / 65504 (common in LLM
  weights) would overflow float16 to inf.

plus ``name.bias`` when the layer has one. A layer left in floating point keeps its ``name.weight`` float, so a
reader tells a quantized layer by ``name.weight_scale``. The layers run through ``RowwiseLinear`` /
``GroupwiseLinear``, which dequantize at every call (as LLMZoo's ``CLinear`` does: this saves memory, not time)
into the input's dtype and call ``F.linear``; gradients reach the input, never the frozen codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from utils.quant.baselines import (CompressionConfig, GroupwisePacked, chatglm_dequantize, chatglm_quantize,
                                   groupwise_compress, groupwise_decompress)

ROWWISE = "chatglm_rowwise"
GROUPWISE = "llmzoo_groupwise"
QUANT_METHODS = (ROWWISE, GROUPWISE)
#: quantize.py's --method names, and the quant_method each writes.
METHOD_NAMES = {"int8_row": ROWWISE, "int4_row": ROWWISE, "groupwise": GROUPWISE, ROWWISE: ROWWISE,
                GROUPWISE: GROUPWISE}
ROW_BITS = {"int8_row": 8, "int4_row": 4}
#: What the per-call dequantization is, for the loader's log line.
BACKEND = "torch (dequantize per call, then F.linear in the input dtype)"


def _family(method: str) -> str:
    try:
        return METHOD_NAMES[method]
    except KeyError:
        raise ValueError(f"unknown row-wise / group-wise method {method!r}; expected one of "
                         f"{', '.join(METHOD_NAMES)}") from None


def _check_row_bits(method: str, bits) -> None:
    if bits not in (4, 8):
        raise ValueError(f"ChatGLM's row-wise quantization has 4 or 8 bits, got {bits!r}")
    if ROW_BITS.get(method, bits) != bits:
        raise ValueError(f"--method {method} is {ROW_BITS[method]}-bit, got bits {bits}")


def _check_compression(config: CompressionConfig) -> None:
    if not 2 <= config.num_bits <= 8:
        raise ValueError(f"group-wise num_bits must lie in 2..8 (one code per byte), got {config.num_bits}")
    if config.group_dim not in (0, 1):
        raise ValueError(f"group_dim must be 0 (output rows) or 1 (input columns) of a linear weight, got "
                         f"{config.group_dim}")
    if config.group_size <= 0:
        raise ValueError(f"group_size must be positive here (-1 is resolved per layer), got {config.group_size}")


# ------------------------------------------------------------------------------------------- payloads


@dataclass
class RowwiseWeight:
    """A linear weight quantized by ChatGLM's per-row absmax, in its stored form.

    Attributes:
        packed: int8 [out, in] (8 bits) or [out, in / 2] (4 bits, two codes a byte).
        scale: float16 [out].
        bits: 4 or 8.
    """

    packed: Tensor
    scale: Tensor
    bits: int

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features) of the weight."""
        rows, cols = self.packed.shape
        return rows, cols * (2 if self.bits == 4 else 1)

    def dequantize(self) -> Tensor:
        """float32 [out, in]: ``code * scale[row]``."""
        return chatglm_dequantize(self.packed, self.scale, self.bits)

    def tensors(self) -> dict[str, Tensor]:
        """The stored tensors, named relative to the layer (ChatGLM's own names)."""
        return {"weight": self.packed, "weight_scale": self.scale}


@dataclass
class GroupwiseWeight:
    """A linear weight quantized by LLMZoo's group-wise compression, in its stored form (module docstring).

    Attributes:
        codes: [out, in], int8 (symmetric) or uint8 (asymmetric).
        scale: float32, [out, groups] (``group_dim`` 1) or [groups, in] (``group_dim`` 0); 0 for a group with no
            range, which then decompresses to 0 (symmetric) or its constant (asymmetric) instead of NaN.
        mn: float32 group minimum, the shape of ``scale`` (asymmetric), else None.
        shape: (out_features, in_features).
        config: the settings, with the group size this layer used (never -1).
    """

    codes: Tensor
    scale: Tensor
    mn: Tensor | None
    shape: tuple[int, int]
    config: CompressionConfig

    def _llmzoo(self) -> GroupwisePacked:
        """The payload as LLMZoo keeps it: codes zero-padded to whole groups, a size-1 axis on scale and mn."""
        d, size = self.config.group_dim, self.config.group_size
        groups = self.scale.shape[d]
        pad = groups * size - self.shape[d]
        codes = self.codes
        if pad:
            filler = codes.new_zeros((pad, self.shape[1]) if d == 0 else (self.shape[0], pad))
            codes = torch.cat([codes, filler], dim=d)
        grouped = (groups, size, self.shape[1]) if d == 0 else (self.shape[0], groups, size)
        mn = None if self.mn is None else self.mn.unsqueeze(d + 1)
        return GroupwisePacked(codes.reshape(grouped), self.scale.unsqueeze(d + 1), mn, torch.Size(self.shape))

    def dequantize(self) -> Tensor:
        """float32 [out, in], by LLMZoo's ``decompress``."""
        return groupwise_decompress(self._llmzoo(), self.config)

    def tensors(self) -> dict[str, Tensor]:
        """The stored tensors, named relative to the layer (``weight_mn`` only when asymmetric)."""
        out = {"weight": self.codes, "weight_scale": self.scale}
        if self.mn is not None:
            out["weight_mn"] = self.mn
        return out


def chatglm_layer(w: Tensor, bits: int) -> RowwiseWeight:
    """ChatGLM's per-row absmax quantization of ``w`` [out, in] at 4 or 8 bits (``baselines.chatglm_quantize``).

    Raises:
        ValueError: bits not 4 or 8, a weight that is not 2-D, an odd input width at 4 bits.
    """
    packed, scale = chatglm_quantize(w, bits)
    return RowwiseWeight(packed.contiguous(), scale.contiguous(), bits)


def groupwise_layer(w: Tensor, config: CompressionConfig) -> GroupwiseWeight:
    """LLMZoo's group-wise quantization of ``w`` [out, in] (``baselines.groupwise_compress``), in stored form.

    Raises:
        ValueError: a weight that is not 2-D, num_bits outside 2..8, a group_dim other than 0 or 1, a group size
            that is not positive.
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    _check_compression(config)
    d = config.group_dim
    packed = groupwise_compress(w, config)
    codes = packed.data.reshape(packed.data.shape[:d] + (-1,) + packed.data.shape[d + 2:])
    codes = codes.narrow(d, 0, w.shape[d]).contiguous()
    mn = None if packed.mn is None else packed.mn.squeeze(d + 1).contiguous()
    return GroupwiseWeight(codes, packed.scale.squeeze(d + 1).contiguous(), mn, tuple(w.shape), config)


def rowwise_packable(in_features: int, out_features: int, method: str, bits: int) -> str | None:
    """Why a linear layer of this shape cannot be stored by ``method`` at ``bits``, or None when it can.

    Only ChatGLM's int4 constrains the shape: it packs input columns in pairs. Group-wise takes any shape (a last
    group that is short is padded at quantization, as in LLMZoo).

    Raises:
        ValueError: an unknown method, or bits the method does not have (a caller's error, not the layer's).
    """
    if _family(method) == ROWWISE:
        _check_row_bits(method, bits)
        if bits == 4 and in_features % 2:
            return (f"in_features = {in_features} is odd, and ChatGLM's int4 packs two input columns into each "
                    "byte")
        return None
    if not 2 <= bits <= 8:
        raise ValueError(f"group-wise num_bits must lie in 2..8 (one code per byte), got {bits}")
    return None


def quantization_config(method: str, bits: int, group_size: int | None = None, group_dim: int = 1,
                        sym: bool | None = None, modules=()) -> dict:
    """config.json's ``quantization_config`` for a folder of row-wise or group-wise layers.

    Args:
        method: ``int8_row`` / ``int4_row`` / ``chatglm_rowwise``, or ``groupwise`` / ``llmzoo_groupwise``.
        bits: 4 or 8 (row-wise), 2..8 (group-wise).
        group_size: group-wise only: elements per group, or -1 for the whole ``group_dim`` of each layer.
        group_dim: group-wise only: 1 (input columns) or 0 (output rows).
        sym: group-wise only: symmetric (LLMZoo's default when None).
        modules: the full names of the quantized layers.

    Returns:
        ``{"quant_method": "chatglm_rowwise", "bits", "modules"}`` or ``{"quant_method": "llmzoo_groupwise",
        "num_bits", "group_size", "group_dim", "symmetric", "modules"}``.
    """
    family = _family(method)
    modules = sorted(str(m) for m in modules)
    if family == ROWWISE:
        _check_row_bits(method, bits)
        return {"quant_method": ROWWISE, "bits": bits, "modules": modules}
    if group_size is None:
        group_size = CompressionConfig().group_size
    if not isinstance(group_size, int) or (group_size != -1 and group_size <= 0):
        raise ValueError(f"group_size must be -1 or a positive integer, got {group_size!r}")
    symmetric = CompressionConfig().symmetric if sym is None else bool(sym)
    _check_compression(CompressionConfig(bits, max(group_size, 1), group_dim, symmetric))
    return {"quant_method": GROUPWISE, "num_bits": bits, "group_size": group_size, "group_dim": group_dim,
            "symmetric": symmetric, "modules": modules}


def settings_from_config(config: dict) -> dict:
    """The validated settings of a ``quantization_config`` written by ``quantization_config``.

    Returns:
        ``{"quant_method", "bits", "modules"}`` and, group-wise, ``"group_size"`` (-1 kept), ``"group_dim"`` and
        ``"symmetric"``; ``modules`` is None when the config lists none.

    Raises:
        ValueError: another quant_method, or a value out of range (named).
    """
    method = str(config.get("quant_method", "")).lower()
    modules = config.get("modules")
    if modules is not None and not (isinstance(modules, list) and all(isinstance(m, str) for m in modules)):
        raise ValueError(f"quantization_config modules must be a list of layer names, got {modules!r}")
    if method == ROWWISE:
        bits = config.get("bits")
        if bits not in (4, 8):
            raise ValueError(f"quantization_config bits {bits!r}; chatglm_rowwise has 4 or 8")
        return {"quant_method": method, "bits": bits, "modules": modules}
    if method == GROUPWISE:
        bits, size, dim = config.get("num_bits"), config.get("group_size"), config.get("group_dim", 1)
        symmetric = config.get("symmetric", True)
        if not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"quantization_config num_bits {bits!r}; llmzoo_groupwise has 2..8")
        if not isinstance(size, int) or (size != -1 and size <= 0):
            raise ValueError(f"quantization_config group_size {size!r}; expected -1 or a positive integer")
        if dim not in (0, 1):
            raise ValueError(f"quantization_config group_dim {dim!r}; expected 0 or 1")
        if not isinstance(symmetric, bool):
            raise ValueError(f"quantization_config symmetric {symmetric!r}; expected true or false")
        return {"quant_method": method, "bits": bits, "group_size": size, "group_dim": dim, "symmetric": symmetric,
                "modules": modules}
    raise ValueError(f"quant_method {method!r} is neither {ROWWISE} nor {GROUPWISE}")


def layer_compression(settings: dict, out_features: int, in_features: int) -> CompressionConfig:
    """The ``CompressionConfig`` one layer was quantized with: a group size of -1 becomes the layer's whole
    ``group_dim`` (so each output row, or each input column, is one group)."""
    d = settings["group_dim"]
    size = settings["group_size"]
    if size == -1:
        size = (out_features, in_features)[d]
    return CompressionConfig(settings["bits"], size, d, settings["symmetric"])


# --------------------------------------------------------------------------------------------- modules


def _expect(tensors: dict[str, Tensor], key: str, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...],
            name: str) -> Tensor:
    """``tensors[key]``, checked for shape and dtype; the error names the layer's tensor."""
    full = f"{name}.{key}" if name else key
    if key not in tensors or tensors[key] is None:
        raise ValueError(f"{full} is missing")
    t = tensors[key]
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{full} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{full} is {t.dtype}, expected {' or '.join(str(d) for d in dtypes)}")
    return t


def _check_bias(bias: Tensor | None, out_features: int, name: str) -> Tensor | None:
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"{name + '.' if name else ''}bias has shape {tuple(bias.shape)}, expected ({out_features},)")
    return bias


class _DequantizedLinear(torch.nn.Module):
    """Shared forward: dequantize the stored tensors, cast to the input's dtype, ``F.linear``."""

    kind = "quantized"
    in_features: int
    out_features: int

    def payload(self):
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        """``.to(device)`` moves the stored tensors, but ``.half()`` / ``.to(dtype)`` leaves their dtypes as the
        format defines them: LLMZoo's float32 multipliers would overflow float16 to inf and decode to zeros."""
        def keep_dtype(t: Tensor) -> Tensor:
            out = fn(t)
            return out if out.dtype == t.dtype else t.to(out.device)

        return super()._apply(keep_dtype, recurse)

    def dequantize(self) -> Tensor:
        """float32 [out, in] from the buffers."""
        return self.payload().dequantize()

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with {self.in_features} features, got shape {tuple(x.shape)}")
        weight = self.dequantize().to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)


class RowwiseLinear(_DequantizedLinear):
    """A linear layer stored as ChatGLM's per-row absmax int8 / int4 (buffers ``weight``, ``weight_scale``,
    ``bias``), dequantized at every call.

    Args:
        in_features, out_features: the layer's shape (W is [out_features, in_features]).
        bits: 4 or 8.
        bias: whether the layer has a bias.
    """

    kind = "ChatGLM row-wise"

    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool = False):
        super().__init__()
        _check_row_bits(ROWWISE, bits)
        if bits == 4 and in_features % 2:
            raise ValueError(f"int4 packs input columns in pairs: in_features = {in_features} is odd")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.register_buffer("weight", torch.zeros(self.packed_shape(in_features, out_features, bits),
                                                   dtype=torch.int8))
        self.register_buffer("weight_scale", torch.zeros(out_features, dtype=torch.float16))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @staticmethod
    def packed_shape(in_features: int, out_features: int, bits: int) -> tuple[int, int]:
        return out_features, in_features // 2 if bits == 4 else in_features

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], in_features: int, out_features: int, bits: int,
                     bias: Tensor | None = None, name: str = "") -> RowwiseLinear:
        """A layer holding ``tensors`` (``RowwiseWeight.tensors()``), checked against the layer's shape.

        Raises:
            ValueError: a missing tensor, or a shape or dtype that does not fit, naming ``name.<tensor>``.
        """
        weight = _expect(tensors, "weight", cls.packed_shape(in_features, out_features, bits), (torch.int8,), name)
        scale = _expect(tensors, "weight_scale", (out_features,), (torch.float16,), name)
        layer = cls(in_features, out_features, bits, bias is not None)
        layer.weight, layer.weight_scale = weight, scale
        layer.bias = _check_bias(bias, out_features, name)
        return layer.to(weight.device)

    @classmethod
    def from_payload(cls, payload: RowwiseWeight, bias: Tensor | None = None) -> RowwiseLinear:
        out_features, in_features = payload.shape
        return cls.from_tensors(payload.tensors(), in_features, out_features, payload.bits, bias)

    def payload(self) -> RowwiseWeight:
        return RowwiseWeight(self.weight, self.weight_scale, self.bits)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"bias={self.bias is not None}")


class GroupwiseLinear(_DequantizedLinear):
    """A linear layer stored as LLMZoo's group-wise codes (buffers ``weight``, ``weight_scale``, ``weight_mn`` when
    asymmetric, ``bias``), dequantized at every call.

    Args:
        in_features, out_features: the layer's shape (W is [out_features, in_features]).
        config: num_bits, the group size this layer uses (positive), group_dim, symmetric.
        bias: whether the layer has a bias.
    """

    kind = "LLMZoo group-wise"

    def __init__(self, in_features: int, out_features: int, config: CompressionConfig, bias: bool = False):
        super().__init__()
        _check_compression(config)
        self.in_features, self.out_features, self.config = in_features, out_features, config
        codes = torch.int8 if config.symmetric else torch.uint8
        groups = self.scale_shape(in_features, out_features, config)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=codes))
        self.register_buffer("weight_scale", torch.zeros(groups))
        self.register_buffer("weight_mn", None if config.symmetric else torch.zeros(groups))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @staticmethod
    def scale_shape(in_features: int, out_features: int, config: CompressionConfig) -> tuple[int, int]:
        """[out, groups] (groups along the inputs) or [groups, in] (along the outputs)."""
        if config.group_dim == 1:
            return out_features, -(-in_features // config.group_size)
        return -(-out_features // config.group_size), in_features

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], in_features: int, out_features: int,
                     config: CompressionConfig, bias: Tensor | None = None, name: str = "") -> GroupwiseLinear:
        """A layer holding ``tensors`` (``GroupwiseWeight.tensors()``), checked against the layer's shape.

        Raises:
            ValueError: a missing or unexpected tensor, or a shape or dtype that does not fit, naming
                ``name.<tensor>``.
        """
        _check_compression(config)
        codes = torch.int8 if config.symmetric else torch.uint8
        groups = cls.scale_shape(in_features, out_features, config)
        weight = _expect(tensors, "weight", (out_features, in_features), (codes,), name)
        scale = _expect(tensors, "weight_scale", groups, (torch.float32,), name)
        if config.symmetric and tensors.get("weight_mn") is not None:
            raise ValueError(f"{name + '.' if name else ''}weight_mn is present, but the quantization is symmetric")
        mn = None if config.symmetric else _expect(tensors, "weight_mn", groups, (torch.float32,), name)
        layer = cls(in_features, out_features, config, bias is not None)
        layer.weight, layer.weight_scale, layer.weight_mn = weight, scale, mn
        layer.bias = _check_bias(bias, out_features, name)
        return layer.to(weight.device)

    @classmethod
    def from_payload(cls, payload: GroupwiseWeight, bias: Tensor | None = None) -> GroupwiseLinear:
        out_features, in_features = payload.shape
        return cls.from_tensors(payload.tensors(), in_features, out_features, payload.config, bias)

    def payload(self) -> GroupwiseWeight:
        return GroupwiseWeight(self.weight, self.weight_scale, self.weight_mn, (self.out_features, self.in_features),
                               self.config)

    def extra_repr(self) -> str:
        c = self.config
        return (f"in_features={self.in_features}, out_features={self.out_features}, num_bits={c.num_bits}, "
                f"group_size={c.group_size}, group_dim={c.group_dim}, symmetric={c.symmetric}, "
                f"bias={self.bias is not None}")
