"""Fused CPU kernel for Ghost BN on ``(N, C)`` inputs, compiled on first use.

Ghost BN with many small virtual batches on a 2-D input is dominated by per-call overhead when it
is expressed through torch's kernels (one batch-norm call per virtual batch, forward and
backward), and unfused element-wise passes when it is vectorized (docs/norm.md has the
measurements). ``_ghost_kernel.c`` does the whole forward, or the whole backward, in one call
with every pass over a virtual batch running from cache.

The C file is compiled once per machine with the system C compiler (``$CC``, else ``cc``, else
``gcc``) into ``$BATCHLAB_KERNEL_CACHE`` (default ``~/.cache/batchlab/kernels``), keyed by a
hash of the source, flags, compiler and CPU flags, written atomically so concurrent processes cannot see a
half-written library. Without a compiler, or with ``BATCHLAB_NO_KERNELS=1``, :func:`available`
is False (the reason is in :func:`unavailable_reason`) and Ghost BN uses torch's kernels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

_SOURCE = Path(__file__).with_name("_ghost_kernel.c")
_BASE_FLAGS = ["-O3", "-shared", "-fPIC", "-fno-math-errno", "-std=c99"]
# tried in order until one builds and loads: the first is what was measured (x86-64 gcc); the
# others keep the kernel on compilers or CPUs that reject a flag (no OpenMP, no
# -mprefer-vector-width outside x86, no -march=native)
_VARIANTS = [
    ["-march=native", "-mprefer-vector-width=256", "-fopenmp"],
    ["-march=native", "-fopenmp"],
    ["-march=native"],
    [],
]
_WRAPPER = """
#include <math.h>
#include <stddef.h>
#define SCALAR float
#define FN(n) n##_f32
#include "_ghost_kernel.c"
#undef SCALAR
#undef FN
#define SCALAR double
#define FN(n) n##_f64
#include "_ghost_kernel.c"
"""
_lock = threading.Lock()
_reason: str | None = None


def _compiler() -> str | None:
    for cand in [os.environ.get("CC"), "cc", "gcc"]:
        if cand and shutil.which(cand):
            return cand
    return None


def cache_dir() -> Path:
    root = os.environ.get("BATCHLAB_KERNEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "batchlab" / "kernels"


def _cpu_id() -> str:
    """What ``-march=native`` depends on, so a cache shared between machines never hands one
    machine code built for another's instruction set."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor() or platform.machine()


def _build(cc: str, extra: list[str]) -> Path:
    src = _SOURCE.read_text()
    flags = _BASE_FLAGS + extra
    key = hashlib.sha256("\0".join([src, _WRAPPER, " ".join(flags), cc, sys.platform, _cpu_id()]).encode()).hexdigest()[:16]
    out = cache_dir() / f"ghost_bn-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        (Path(tmp) / "_ghost_kernel.c").write_text(src)
        (Path(tmp) / "wrapper.c").write_text(_WRAPPER)
        lib = Path(tmp) / "lib.so"
        proc = subprocess.run([cc, *flags, "-I", tmp, "-o", str(lib), str(Path(tmp) / "wrapper.c"), "-lm"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed ({proc.returncode}): {proc.stderr.strip()[:500]}")
        os.replace(lib, out)  # atomic: a concurrent builder either sees nothing or the whole file
    return out


def _load(cc: str) -> ctypes.CDLL:
    """The first flag variant that builds and loads (the OpenMP one parallelizes over virtual
    batches); the first variant's error when none does."""
    first: Exception | None = None
    for extra in _VARIANTS:
        try:
            return ctypes.CDLL(str(_build(cc, extra)))
        except (OSError, RuntimeError) as exc:
            first = first or exc
    assert first is not None
    raise first


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    global _reason
    if os.environ.get("BATCHLAB_NO_KERNELS", "") not in ("", "0"):
        _reason = "disabled by BATCHLAB_NO_KERNELS"
        return None
    cc = _compiler()
    if cc is None:
        _reason = "no C compiler found ($CC, cc, gcc)"
        return None
    try:
        with _lock:
            lib = _load(cc)
    except (OSError, RuntimeError) as exc:
        _reason = f"building the kernel failed: {exc}"
        return None
    vp, ll, d = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_double
    lib.fns = {}
    for dtype, suffix in ((torch.float32, "f32"), (torch.float64, "f64")):
        fwd = getattr(lib, f"ghost_bn_forward_{suffix}")
        fwd.argtypes = [vp, vp, vp, vp, vp, vp, vp, vp, d, ll, ll, ll, ll, d, ll, vp]
        fwd.restype = None
        bwd = getattr(lib, f"ghost_bn_backward_{suffix}")
        bwd.argtypes = [vp, vp, vp, vp, vp, vp, vp, vp, ll, ll, ll, ll, vp]
        bwd.restype = None
        lib.fns[dtype] = (fwd, bwd)
    return lib


def available() -> bool:
    """Whether the fused kernel is built (building it now if needed) and loadable."""
    return _library() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False, or None."""
    _library()
    return _reason


def eligible(x: Tensor) -> bool:
    """Inputs the fused kernel handles: a contiguous 2-D float32/float64 CPU tensor."""
    return x.device.type == "cpu" and x.dim() == 2 and x.dtype in (torch.float32, torch.float64) and x.is_contiguous()


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


# below this many elements, starting threads costs more than it saves
PARALLEL_MIN_ELEMENTS = 1 << 15


def _threads(elements: int, groups: int) -> int:
    """Threads for one call: torch's intra-op thread count for large inputs, else one."""
    if elements < PARALLEL_MIN_ELEMENTS:
        return 1
    return max(1, min(torch.get_num_threads(), groups, 64))


def _as(t: Tensor | None, like: Tensor) -> Tensor | None:
    """``t`` usable by the kernel for input ``like``: same dtype, contiguous (no copy if already)."""
    if t is None or (t.dtype == like.dtype and t.is_contiguous()):
        return t
    return t.detach().to(like.dtype).contiguous()


def ghost_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float | None,
    k0: int,
    vbs: int,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """``y`` and, per virtual batch, ``mean - x[first row]`` and ``invstd`` (``(G, C)``, ``x``'s
    dtype), which :func:`ghost_backward` takes.

    The running buffers are updated in place, once per virtual batch in order (``momentum``
    None: cumulative average with ``k0`` batches already counted); they must be contiguous
    and of ``x``'s dtype (see :func:`buffers_ok`)."""
    lib = _library()
    assert lib is not None  # callers checked eligible(x) and buffers_ok(...)
    n, c = x.shape
    groups = -(-n // vbs)
    y = torch.empty_like(x)
    # two (G, C) tensors rather than one (2, G, C): each stays under glibc's mmap threshold for
    # the usual sizes, so it comes from the heap instead of fresh (page-faulting) pages
    dmean, invstd = x.new_empty(groups, c), x.new_empty(groups, c)
    t = _threads(n * c, groups)
    work = torch.empty(t * 12 * c, dtype=torch.float64)  # per thread: 4 double + 6 scalar arrays of C
    lib.fns[x.dtype][0](
        x.data_ptr(), _ptr(_as(weight, x)), _ptr(_as(bias, x)), y.data_ptr(), dmean.data_ptr(), invstd.data_ptr(),
        _ptr(running_mean), _ptr(running_var), -1.0 if momentum is None else float(momentum), k0,
        n, vbs, c, float(eps), t, work.data_ptr(),
    )
    return y, dmean, invstd


def buffers_ok(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None) -> bool:
    """Running buffers the kernel can update in place: none, or both contiguous, ``(C,)``, of
    ``x``'s dtype and on the CPU."""
    if running_mean is None or running_var is None:
        return running_mean is None and running_var is None
    for t in (running_mean, running_var):
        if t.dtype != x.dtype or not t.is_contiguous() or t.device.type != "cpu" or t.shape != (x.shape[1],):
            return False
    return True


def ghost_backward(
    gy: Tensor, x: Tensor, dmean: Tensor, invstd: Tensor, weight: Tensor | None, vbs: int, want_dw: bool, want_db: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``dx`` and (when asked for) the weight and bias gradients, in ``x``'s dtype."""
    lib = _library()
    assert lib is not None
    gy = _as(gy, x)
    n, c = x.shape
    dx = torch.empty_like(x)
    dw = x.new_empty(c) if want_dw else None
    db = x.new_empty(c) if want_db else None
    t = _threads(n * c, -(-n // vbs))
    work = torch.empty(t * 12 * c, dtype=torch.float64)
    lib.fns[x.dtype][1](
        gy.data_ptr(), x.data_ptr(), dmean.data_ptr(), invstd.data_ptr(), _ptr(_as(weight, x)), dx.data_ptr(),
        _ptr(dw), _ptr(db), n, vbs, c, t, work.data_ptr(),
    )
    return dx, dw, db
