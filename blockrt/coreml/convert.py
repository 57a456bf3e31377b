"""Converting one ``ExportBlock`` to a CoreML ML program: eager run, trace, checks, ``ct.convert``, compression.

The block runs eagerly on its example inputs (its outputs are the reference), is traced with
``torch.jit.trace``, and the traced graph is checked against eager (``torch.equal``); a ``reference``
module (the block before the rewrites made for CoreML) is compared the same way. Then coremltools converts
the trace with the block's input shapes (fixed, ``RangeDim`` or ``EnumeratedShapes``) and the run's
precision and target, and the weights are optionally compressed (``quantize.py``). An operation coremltools
cannot convert becomes an ``ExportError`` naming the block and the op.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .quantize import compress
from .spec import DEFAULT, ExportBlock, ExportError, ExportOptions, TensorIO

log = logging.getLogger(__name__)

_PROGRESS_BAR = re.compile(r"\d+%\||\[\d+:\d+<|\d+ \w+/s\]|\? \w+/s\]|\d+ passes \[")
_OP_NOT_IMPLEMENTED = re.compile(r"convert function for op '([^']+)' not implemented")
_OP_FAILED = re.compile(r"ERROR - converting '([^']+)' op \(located at: '([^']*)'\)")
_FIX = ("fix: rewrite that operation with ones CoreML supports (rank <= 5, no complex numbers; see "
        "environment.md for verified workarounds), register a converter with coremltools' "
        "@register_torch_op, or keep it out of the exported blocks")


@dataclass
class Converted:
    """A converted block: the MLModel (not yet saved) and what the manifest records about it."""

    mlmodel: Any
    inputs: tuple[TensorIO, ...]
    outputs: tuple[TensorIO, ...]
    quantization: str | None
    checks: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def io_dtype(dtype: torch.dtype) -> str:
    """The CoreML feature dtype a torch tensor of ``dtype`` is exported as: floats -> float32, integers ->
    int32, bool -> float32 (Core ML has no bool arrays: the app passes 0.0 / 1.0 and the model casts)."""
    if dtype.is_floating_point or dtype == torch.bool:
        return "float32"
    if dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        return "int32"
    raise ExportError(f"tensor dtype {dtype} cannot be a CoreML input or output; expected a float, int or bool tensor")


_NP = {"float32": np.float32, "int32": np.int32}


def _as_outputs(out: Any, block: ExportBlock) -> tuple[torch.Tensor, ...]:
    outs = (out,) if isinstance(out, torch.Tensor) else out
    if not isinstance(outs, tuple) or not all(isinstance(o, torch.Tensor) for o in outs):
        raise ExportError(f"block {block.name!r}: module returned {type(out).__name__}; expected a tensor or a tuple "
                          "of tensors (wrap the module to return exactly those)", block=block.name)
    if len(outs) != len(block.output_names):
        raise ExportError(f"block {block.name!r}: module returned {len(outs)} tensor(s) but output_names has "
                          f"{len(block.output_names)} {block.output_names}; give one name per output", block=block.name)
    for k, o in enumerate(outs):
        same = [block.input_names[j] for j, x in enumerate(block.example_inputs) if o is x]
        if same:
            raise ExportError(f"block {block.name!r}: output {block.output_names[k]!r} is input {same[0]!r} passed "
                              "through unchanged, which Core ML cannot express; fix: drop it from the outputs (the app "
                              "already holds it)", block=block.name)
        twice = [block.output_names[j] for j in range(k) if outs[j] is o]
        if twice:
            raise ExportError(f"block {block.name!r}: outputs {twice[0]!r} and {block.output_names[k]!r} are the same "
                              "tensor; fix: return it once", block=block.name)
    return outs


def _compare(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> tuple[bool, float]:
    """(all equal, max abs error) between two output tuples of the same structure."""
    equal = len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))
    err = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return False, float("inf")
        if x.numel():
            err = max(err, (x.double() - y.double()).abs().max().item())
    return equal, err


def _ct_input(block: ExportBlock, name: str, x: torch.Tensor) -> Any:
    import coremltools as ct

    dtype = _NP[io_dtype(x.dtype)]
    if name in block.enumerated:
        shape = ct.EnumeratedShapes(shapes=[list(s) for s in block.enumerated[name]], default=list(x.shape))
    elif name in block.flexible:
        shape = ct.Shape([d if isinstance(d, int) else ct.RangeDim(lower_bound=d[0], upper_bound=d[1], default=e)
                          for d, e in zip(block.flexible[name], x.shape)])
    else:
        shape = tuple(int(s) for s in x.shape)
    return ct.TensorType(name=name, shape=shape, dtype=dtype)


def convert_block(block: ExportBlock, options: ExportOptions) -> Converted:
    """Trace, check, convert and compress ``block``; raises ``ExportError`` naming the block on failure."""
    import coremltools as ct

    seconds: dict[str, float] = {}
    checks: dict[str, Any] = {"trace_equal": None, "reference_equal": None, "max_abs_error": None}
    module = block.module.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        eager = _as_outputs(module(*block.example_inputs), block)
        if options.check and block.expected_outputs is not None:
            checks["expected_equal"], checks["expected_max_abs_error"] = _compare(eager, tuple(block.expected_outputs))
            if not checks["expected_equal"]:
                log.warning("block %s: the module's outputs differ from the recorded ones (max abs error %.3g)",
                            block.name, checks["expected_max_abs_error"])
        if options.check and block.reference is not None:
            ref = _as_outputs(block.reference.eval()(*block.example_inputs), block)
            checks["reference_equal"], checks["max_abs_error"] = _compare(eager, ref)
        try:
            traced = torch.jit.trace(module, block.example_inputs, check_trace=False, strict=False)
        except Exception as e:
            raise ExportError(f"block {block.name!r}: torch.jit.trace failed: {type(e).__name__}: {e}; fix: make the "
                              "module traceable (tensor inputs and outputs, no data-dependent Python control flow)",
                              block=block.name) from e
        if options.check:
            checks["trace_equal"], trace_err = _compare(_as_outputs(traced(*block.example_inputs), block), eager)
            checks["trace_max_abs_error"] = trace_err
            if not checks["trace_equal"]:
                log.warning("block %s: the traced graph differs from eager (max abs error %.3g); data-dependent "
                            "control flow was frozen at the example inputs", block.name, trace_err)
    seconds["trace_s"] = time.perf_counter() - t0
    inputs = tuple(TensorIO(n, block.input_shape(n), io_dtype(x.dtype),
                            tuple(block.enumerated[n]) if n in block.enumerated else None)
                   for n, x in zip(block.input_names, block.example_inputs))
    outputs = tuple(TensorIO(n, tuple(int(s) for s in y.shape), io_dtype(y.dtype))
                    for n, y in zip(block.output_names, eager))
    precision = ct.precision.FLOAT16 if options.precision == "fp16" else ct.precision.FLOAT32
    target = getattr(ct.target, options.target, None)
    if target is None:
        raise ExportError(f"ExportOptions.target={options.target!r} is not a coremltools.target of coremltools "
                          f"{ct.__version__}; expected one of {[t.name for t in ct.target]}")
    t0 = time.perf_counter()
    failing = _FailingOp()
    logging.getLogger("coremltools").addHandler(failing)
    try:
        with converter_console():
            mlmodel = ct.convert(
                traced, convert_to="mlprogram", minimum_deployment_target=target,
                compute_precision=precision, skip_model_load=True,
                inputs=[_ct_input(block, n, x) for n, x in zip(block.input_names, block.example_inputs)],
                outputs=[ct.TensorType(name=o.name, dtype=_NP[o.dtype]) for o in outputs])
    except Exception as e:
        raise conversion_error(block.name, e, failing.op, failing.location) from e
    finally:
        logging.getLogger("coremltools").removeHandler(failing)
        del traced
    seconds["convert_s"] = time.perf_counter() - t0
    mode = options.quantize if block.quantize == DEFAULT else block.quantize
    if mode is not None:
        t0 = time.perf_counter()
        try:
            with converter_console():
                mlmodel = compress(mlmodel, mode, options.quantize_skip_ops, options.min_quantize_elements)
        except Exception as e:
            raise ExportError(f"block {block.name!r}: {mode} weight compression failed: {type(e).__name__}: {e}",
                              block=block.name) from e
        seconds["quantize_s"] = time.perf_counter() - t0
    return Converted(mlmodel, inputs, outputs, mode, checks, seconds)


@contextlib.contextmanager
def converter_console() -> Iterator[None]:
    """Keep coremltools' own progress bars (one per conversion pass) off the console: the exporter reports
    progress per block instead. Anything else it writes to stderr is passed on as a log warning."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf):
            yield
    finally:
        for line in re.split(r"[\r\n]+", buf.getvalue()):
            if line.strip() and not _PROGRESS_BAR.search(line) and not _OP_FAILED.search(line):
                log.warning("coremltools: %s", line.strip())


class _FailingOp(logging.Handler):
    """Catches coremltools' log line naming the op whose conversion raised (and where it sits in the module)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.op: str | None = None
        self.location = ""

    def emit(self, record: logging.LogRecord) -> None:
        m = _OP_FAILED.search(record.getMessage())
        if m and self.op is None:
            self.op, self.location = m.group(1), m.group(2)


def conversion_error(block: str, e: BaseException, op: str | None = None, location: str = "") -> ExportError:
    """An ``ExportError`` for a coremltools conversion failure, naming the block and (when known) the op."""
    m = _OP_NOT_IMPLEMENTED.search(str(e))
    where = f" at {location!r}" if location else ""
    if m:
        op = m.group(1)
        return ExportError(f"block {block!r}: coremltools cannot convert the PyTorch op {op!r}{where} (coremltools "
                           f"has no converter for it); {_FIX}", block=block, op=op)
    what = f"the PyTorch op {op!r}{where}" if op else "it"
    return ExportError(f"block {block!r}: coremltools failed to convert {what}: {type(e).__name__}: {e}; {_FIX}",
                       block=block, op=op)
