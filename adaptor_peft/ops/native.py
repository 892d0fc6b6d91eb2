"""The compiled CPU kernels: builds ``selective_scan_cpu.c`` (the scan, with Adaptor-T's memory read) and
``depthwise_cpu.c`` once per machine and calls them.

The C source is compiled with the system C compiler at first use and cached (``ADAPTOR_PEFT_CACHE``,
default ``~/.cache/adaptor_peft``); no Python headers, torch headers or build tools beyond ``cc`` are
needed. It is called through ``ctypes`` and threads with OpenMP: linked against ``libgomp.so.1``, which
PyTorch has already loaded, it runs on PyTorch's own OpenMP threads and follows
``torch.set_num_threads``; a compiler without OpenMP gives a single-threaded build. Where no compiler
works, :func:`available` is False and the dispatcher uses the PyTorch implementation instead.

Code is generated for this machine's CPU (``-march=native``); ``ADAPTOR_PEFT_CPU_TARGET`` names another
GCC/Clang ``-march`` target, e.g. ``x86-64-v3`` (AVX2 + FMA, any x86 machine of the last decade) for a
cache shared by machines that differ, or to measure what a machine without AVX-512 gets. Each target
is built and cached on its own; a build not loaded for 30 days is removed when a new one is made. A
target newer than the CPU (``x86-64-v4`` on an AVX2 machine) builds, then stops the process with an
illegal instruction at the first call: name one the CPU has.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from functools import cache
from pathlib import Path

import torch

from ..provenance import cpu_fields, cpu_flags
from .records import GradsOut, ScanGrads, ScanInputs, ScanOutput, reverse_positions

SOURCES = tuple(Path(__file__).with_name(name) for name in ("selective_scan_cpu.c", "depthwise_cpu.c"))
# -ffp-contract=fast: ISO C mode would otherwise forbid fused multiply-adds (a quarter of the scan's time)
FLAGS = ("-O3", "-fno-trapping-math", "-ffp-contract=fast", "-fopenmp-simd", "-fPIC", "-shared", "-std=c11")
GCC_FLAGS = ("-fno-thread-jumps",)
"""Tried first, dropped if the compiler refuses them: GCC's jump threading splits a vectorised silu at the exp's
range clamp into two masked divisions, which made the scan's gate about three times slower."""
TARGET_ENV = "ADAPTOR_PEFT_CPU_TARGET"
STALE_DAYS = 30
"""A cached build not loaded for this long is removed when a new one is made: every source version, target
and compiler gets its own file, so the cache would otherwise only grow."""
_TEMPORARY = "building_"  # the name of a build in progress starts with this

_I64x2 = ctypes.c_int64 * 2
_I64x3 = ctypes.c_int64 * 3
_I64x4 = ctypes.c_int64 * 4
_P = ctypes.c_void_p


class _ScanArgs(ctypes.Structure):
    """Mirror of ``ScanArgs`` in the C source; field order must match it exactly."""

    _fields_ = [
        *[(name, ctypes.c_int64) for name in ("batch", "dim", "len", "nstate", "groups")],
        *[(name, _P) for name in ("u", "delta", "delta_bias", "A", "B", "C", "Dskip", "z")],
        ("softplus", ctypes.c_int64),
        ("u_s", _I64x3), ("delta_s", _I64x3), ("z_s", _I64x3), ("B_s", _I64x4), ("C_s", _I64x4),
        *[(name, _P) for name in ("out", "last_state", "hidden", "dout", "du", "ddelta", "dz", "dA", "dD",
                                  "ddelta_bias", "dB", "dC")],
        ("out_s", _I64x3), ("dout_s", _I64x3), ("ddelta_s", _I64x3), ("du_s", _I64x3), ("dz_s", _I64x3),
        ("snap_groups", ctypes.c_int64), ("nsnap", ctypes.c_int64),
        *[(name, _P) for name in ("snapshot_index", "snapshots", "dsnapshots")],
        *[(name, _P) for name in ("read_frac", "read_weights", "read_scale", "dread_frac", "dread_weights",
                                  "dread_scale")],
    ]  # fmt: skip


def cache_dir() -> Path:
    return Path(os.environ.get("ADAPTOR_PEFT_CACHE") or Path.home() / ".cache" / "adaptor_peft")


def _machine_fingerprint() -> bytes:
    """Distinguishes CPUs, since ``-march=native`` output may not run on another one."""
    return f"{platform.machine()}|{platform.processor()}|{cpu_flags(cpu_fields())}".encode()


def cpu_target() -> str:
    """The ``-march`` target compiled code is generated for: ``$ADAPTOR_PEFT_CPU_TARGET``, else ``native``."""
    return os.environ.get(TARGET_ENV) or "native"


def _library(double: bool) -> ctypes.CDLL | None:
    return _build(double, cpu_target())


@cache
def _build(double: bool, target: str) -> ctypes.CDLL | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if sys.platform == "win32" or not compiler:
        return None
    flags = (*FLAGS, f"-march={target}", *(("-DSCAN_DOUBLE",) if double else ()))
    sources = b"".join(source.read_bytes() for source in SOURCES)
    machine = _machine_fingerprint() if target == "native" else b""  # a named target runs on every machine it names
    key = hashlib.sha256(sources + compiler.encode() + " ".join((*flags, *GCC_FLAGS)).encode() + machine)
    path = cache_dir() / f"adaptor_peft_cpu_{'f64' if double else 'f32'}_{key.hexdigest()[:16]}.so"
    if not path.exists():
        if not _compile(compiler, flags, path):
            return None
        _prune_stale(path.parent)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as err:  # a damaged cache entry, or one built against another C library: rebuild once
        if not _compile(compiler, flags, path):
            return None
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:
            warnings.warn(f"adaptor_peft: cannot load {path} ({err}), using the PyTorch scan", RuntimeWarning, 2)
            return None
    with contextlib.suppress(OSError):  # loaded now: fresh for the pruning (a read-only cache stays as it is)
        os.utime(path)
    suffix = "f64" if double else "f32"
    lib.scan_args_size.restype = ctypes.c_int64
    if lib.scan_args_size() != ctypes.sizeof(_ScanArgs):
        raise RuntimeError(
            f"adaptor_peft: {path} has a ScanArgs of {lib.scan_args_size()} bytes, its Python mirror "
            f"{ctypes.sizeof(_ScanArgs)}: the two must list the same fields"
        )
    for name in ("forward", "backward"):
        fn = getattr(lib, f"scan_{name}_{suffix}")
        fn.argtypes = [ctypes.POINTER(_ScanArgs)]
        fn.restype = ctypes.c_int
    taps, grad = getattr(lib, f"depthwise_taps_{suffix}"), getattr(lib, f"depthwise_taps_grad_{suffix}")
    taps.argtypes = [_P, _I64x2, _P, _P, _P, *[ctypes.c_int64] * 7, _P]  # x, strides, weight, bias, offsets, ...
    grad.argtypes = [_P, _I64x2, _P, _I64x2, _P, *[ctypes.c_int64] * 6, _P]  # x, strides, g, strides, offsets, ...
    taps.restype = grad.restype = None
    return lib


def _prune_stale(folder: Path) -> None:
    """Removes the builds, and the temporary files of interrupted ones, older than :data:`STALE_DAYS`."""
    cutoff = time.time() - STALE_DAYS * 86400
    for old in folder.glob("*.so"):
        if old.name.startswith(("adaptor_peft_cpu_", _TEMPORARY)):
            with contextlib.suppress(OSError):  # another process may prune it too
                if old.stat().st_mtime < cutoff:
                    old.unlink()


def _compile(compiler: str, flags: tuple[str, ...], target: Path) -> bool:
    """Builds ``target`` atomically, with OpenMP and :data:`GCC_FLAGS` where the compiler takes them; warns and
    returns False on failure."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TEMPORARY, suffix=".so", dir=target.parent)
    os.close(fd)
    for extra in (("-fopenmp", *GCC_FLAGS), ("-fopenmp",), ()):
        result = subprocess.run(
            [compiler, *flags, *extra, *map(str, SOURCES), "-o", tmp], capture_output=True, text=True
        )
        if result.returncode == 0:
            os.replace(tmp, target)
            return True
    os.unlink(tmp)
    warnings.warn(
        f"adaptor_peft: compiling {', '.join(map(str, SOURCES))} with {compiler} failed, using the PyTorch scan "
        f"(slower on CPU):\n"
        f"{result.stderr[-2000:]}",
        RuntimeWarning,
        stacklevel=4,
    )
    return False


def available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether the compiled scan can run for ``dtype`` (float32 or float64) on this machine."""
    return dtype in (torch.float32, torch.float64) and _library(dtype == torch.float64) is not None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _set_along(args: _ScanArgs, reverse: bool, **tensors: torch.Tensor | None) -> None:
    """Sets each named tensor's pointer and, for a tensor given, its strides (the field named with ``_s``); a
    tensor whose last dimension is position is read from its last position backwards when ``reverse``, so
    that a reversed scan runs over it in place as over a flipped copy."""
    for name, t in tensors.items():
        if t is None:
            setattr(args, name, None)
            continue
        strides, pointer = list(t.stride()), t.data_ptr()
        if reverse:
            pointer += (t.shape[-1] - 1) * strides[-1] * t.element_size()
            strides[-1] = -strides[-1]
        setattr(args, name, pointer)
        setattr(args, f"{name}_s", (ctypes.c_int64 * len(strides))(*strides))


def _lanes_like(x: torch.Tensor) -> torch.Tensor:
    """An empty (batch, dim, len) tensor like ``x``, with channels adjacent in memory where ``x`` has them: the
    kernel then writes one vector per position, and the mixer's next layers read positions as rows."""
    batch, dim, length = x.shape
    if x.stride(1) == 1 and dim > 1:
        return x.new_empty(batch, length, dim).transpose(1, 2)
    return x.new_empty(batch, dim, length)


def _args(x: ScanInputs, read_weights: torch.Tensor | None) -> _ScanArgs:
    """The kernel's arguments for ``x``, with ``read_weights`` in scan-step order."""
    batch, dim, length = x.u.shape
    snap = x.snapshot_index
    args = _ScanArgs(
        batch=batch,
        dim=dim,
        len=length,
        nstate=x.A.shape[1],
        groups=x.B.shape[1],
        delta_bias=_ptr(x.delta_bias),
        A=_ptr(x.A),
        Dskip=_ptr(x.D),
        softplus=int(x.softplus),
        snap_groups=snap.shape[1] if snap is not None else 1,
        nsnap=snap.shape[2] if snap is not None else 0,
        snapshot_index=_ptr(snap),
        read_frac=_ptr(x.read_frac),
        read_weights=_ptr(read_weights),
        read_scale=_ptr(x.read_scale),
    )
    _set_along(args, x.reverse, u=x.u, delta=x.delta, z=x.z, B=x.B, C=x.C)
    return args


def _function(name: str, dtype: torch.dtype):
    double = dtype == torch.float64
    return getattr(_library(double), f"{name}_{'f64' if double else 'f32'}")


def _call(name: str, dtype: torch.dtype, *args) -> None:
    """Calls a kernel that returns non-zero when it could not allocate its work buffers."""
    if _function(name, dtype)(*args):
        raise MemoryError(f"adaptor_peft: the compiled {name} could not allocate its work buffers")


def forward(
    x: ScanInputs, want_last: bool, want_hidden: bool, for_backward: bool = False
) -> tuple[ScanOutput, tuple[()]]:
    """Same contract as :func:`adaptor_peft.ops.scan_torch.forward`, and the memory read (the ``read_*``
    fields: added to ``out``, whose snapshots then stay inside); inputs already in one float dtype, and A, D,
    the Δ bias, the snapshot positions and the read's tensors contiguous (the dispatcher makes them so)."""
    batch, dim, length = x.u.shape
    n = x.A.shape[1]
    new = x.u.new_empty
    out = _lanes_like(x.u)
    last = new(batch, dim, n) if want_last else None
    hidden = new(batch, dim, length, n) if want_hidden else None
    returned = x.snapshot_index is not None and x.read_weights is None
    snapshots = new(batch, dim, x.snapshot_index.shape[2], n) if returned else None
    read_weights = reverse_positions(x.read_weights, x.reverse)  # the kernel indexes it by step
    args = _args(x, read_weights)
    args.last_state, args.hidden, args.snapshots = _ptr(last), _ptr(hidden), _ptr(snapshots)
    _set_along(args, x.reverse, out=out)
    _call("scan_forward", x.u.dtype, ctypes.byref(args))
    hidden = hidden.flip(2) if x.reverse and hidden is not None else hidden  # the kernel writes it by step
    return ScanOutput(out, last, hidden, snapshots), ()


def backward(x: ScanInputs, grads: GradsOut, saved: tuple[()] = ()) -> ScanGrads:
    """Same contract as :func:`adaptor_peft.ops.scan_torch.backward`."""
    u, delta = x.u, x.delta
    dim = u.shape[1]
    dsnapshots = grads.snapshots
    dsnapshots = None if dsnapshots is None or x.snapshot_index is None else dsnapshots.contiguous()
    # dout is read in any layout; ddelta is written in Δ's (usually a view of (batch, len, dim)), so that
    # the Δ projection's backward need not copy it, and du and dz with channels adjacent where u and z have them
    du, ddelta = _lanes_like(u), torch.empty_like(delta)
    dz = _lanes_like(x.z) if x.z is not None else None
    dA, dB, dC = u.new_zeros(x.A.shape), u.new_zeros(x.B.shape), u.new_zeros(x.B.shape)
    dD = u.new_zeros(dim) if x.D is not None else None
    dbias = u.new_zeros(dim) if x.delta_bias is not None else None
    reads = (x.read_frac, x.read_weights, x.read_scale)
    dread = tuple(None if t is None else torch.zeros_like(t) for t in reads)
    read_weights = reverse_positions(x.read_weights, x.reverse)  # the kernel indexes it by step
    args = _args(x, read_weights)
    pointers = dict(dsnapshots=dsnapshots, dA=dA, dD=dD, ddelta_bias=dbias, dB=dB, dC=dC)
    pointers.update(zip(("dread_frac", "dread_weights", "dread_scale"), dread, strict=True))
    for name, t in pointers.items():
        setattr(args, name, _ptr(t))
    _set_along(args, x.reverse, dout=grads.out, du=du, ddelta=ddelta, dz=dz)
    _call("scan_backward", u.dtype, ctypes.byref(args))
    dB, dC, dweights = (reverse_positions(t, x.reverse) for t in (dB, dC, dread[1]))  # written by step
    return ScanGrads(du, ddelta, dbias, dA, dB, dC, dD, dz, dread[0], dweights, dread[2])


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` (batch, tokens, channels) with adjacent channels, read in place where it has them already."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _row_strides(x: torch.Tensor) -> ctypes.Array:
    return _I64x2(x.stride(0), x.stride(1))


def depthwise_taps(
    x: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor,
    grid: tuple[int, int],
    skip: int | None,
    keep_skip: bool,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y[b, p] = bias + Σ_t weight[t, c] x[b, p + (dy_t, dx_t)]`` over the ``grid`` of patch tokens of ``x``
    (batch, tokens, channels; any batch and token strides), zero outside it; the token at ``skip`` (not a
    patch) is ``x``'s with ``keep_skip``, else zero. Returns a contiguous tensor. Float32 or float64,
    integer ``offsets`` (taps, 2); the compiled library must be :func:`available` for the dtype."""
    x, weight, offsets = _rows(x), weight.to(x.dtype).contiguous(), offsets.to(torch.int64).contiguous()
    bias = None if bias is None else bias.to(x.dtype).contiguous()
    y = x.new_empty(x.shape)
    sizes = (offsets.shape[0], x.shape[0], *grid, x.shape[-1], _skip(skip), int(keep_skip))
    _function("depthwise_taps", x.dtype)(
        _ptr(x), _row_strides(x), _ptr(weight), _ptr(bias), _ptr(offsets), *sizes, _ptr(y)
    )
    return y


def depthwise_taps_grad(
    x: torch.Tensor, g: torch.Tensor, offsets: torch.Tensor, grid: tuple[int, int], skip: int | None
) -> torch.Tensor:
    """``dweight[t, c] = Σ_{b,p} x[b, p + (dy_t, dx_t)] g[b, p]`` over the patches of :func:`depthwise_taps`'s
    token layout (any batch and token strides); (taps, channels)."""
    x, g, offsets = _rows(x), _rows(g.to(x.dtype)), offsets.to(torch.int64).contiguous()
    per_row = x.new_empty(x.shape[0], offsets.shape[0], x.shape[-1])
    _function("depthwise_taps_grad", x.dtype)(
        _ptr(x),
        _row_strides(x),
        _ptr(g),
        _row_strides(g),
        _ptr(offsets),
        offsets.shape[0],
        x.shape[0],
        *grid,
        x.shape[-1],
        _skip(skip),
        _ptr(per_row),
    )
    return per_row.sum(0)


def _skip(index: int | None) -> int:
    return -1 if index is None else index
