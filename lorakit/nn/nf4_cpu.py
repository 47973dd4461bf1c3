"""NF4 dequantization on the CPU by a small C kernel, compiled for this machine on first use.

Why hand-written: a 7B QLoRA step on a CPU spends most of its time turning 4-bit codes back into weights (BENCHMARKS
§17: half the step in the torch.compile'd decode, which inductor turns into a per-element gather, about 11 cycles an
element; bitsandbytes' CPU kernel runs at the same rate). The lookup is a 16-entry table: one AVX-512 permute (two
AVX2 permutes and a blend) looks up 16 (8) elements at once, which neither torch nor bitsandbytes emits on the CPU.

The kernel computes exactly what `nf4._dequantize_torch` computes: each value the float32 product
NF4_CODE[nibble] · scale[block], rounded once to float32, bfloat16 or float16 (round to nearest even); nf4 uses it
only after checking that it gives the same bits on a probe weight. Compiled with the system's C compiler (`CC`, else
`cc`) and `-O3 -march=native` into a cache folder (LORAKIT_CACHE, else ~/.cache/lorakit), keyed by the source, the
flags and the CPU; no compiler: `KernelUnavailable`, and nf4 takes the next path. Threads: the blocks are split
across torch.get_num_threads() Python threads, each calling the kernel (ctypes releases the GIL).

Output memory is reused. A dequantized weight lives for one matmul (or one block's backward), then the next one of
the same size is made: from fresh memory, the kernel zero-fills every page first (a 11008 × 4096 bf16 weight:
5.6 G elements/s into a reused buffer, 0.75 G into a new one). So each output is lent from a pool of buffers per
size, and goes back to it when the last tensor using it is freed. The pool holds at most as many buffers of a size
as were ever alive at once (a checkpointed block's weights), for the life of the process.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import weakref
from pathlib import Path

import numpy as np
import torch

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

/* 16 bytes (32 codes, the first of each byte in its high nibble) -> 32 float32 values code[nibble] * s. */
static void lookup32(const uint8_t *p, const float *code, float s, float *dst) {
#if defined(__AVX512F__)
    __m128i b = _mm_loadu_si128((const __m128i *)p), low4 = _mm_set1_epi8(0x0f);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4), lo = _mm_and_si128(b, low4);
    __m512 table = _mm512_loadu_ps(code), vs = _mm512_set1_ps(s);
    __m512i i0 = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo)), i1 = _mm512_cvtepu8_epi32(_mm_unpackhi_epi8(hi, lo));
    _mm512_storeu_ps(dst, _mm512_mul_ps(_mm512_permutexvar_ps(i0, table), vs));
    _mm512_storeu_ps(dst + 16, _mm512_mul_ps(_mm512_permutexvar_ps(i1, table), vs));
#elif defined(__AVX2__)
    __m128i b = _mm_loadu_si128((const __m128i *)p), low4 = _mm_set1_epi8(0x0f);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4), lo = _mm_and_si128(b, low4);
    __m128i e[2] = {_mm_unpacklo_epi8(hi, lo), _mm_unpackhi_epi8(hi, lo)};
    __m256 t0 = _mm256_loadu_ps(code), t1 = _mm256_loadu_ps(code + 8), vs = _mm256_set1_ps(s);
    for (int h = 0; h < 2; h++) {
        for (int q = 0; q < 2; q++) {
            __m256i idx = _mm256_cvtepu8_epi32(q ? _mm_srli_si128(e[h], 8) : e[h]);
            __m256 upper = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));  /* bit 3 -> sign: which half */
            __m256 v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t0, idx), _mm256_permutevar8x32_ps(t1, idx), upper);
            _mm256_storeu_ps(dst + 16 * h + 8 * q, _mm256_mul_ps(v, vs));
        }
    }
#else
    for (int j = 0; j < 16; j++) {
        dst[2 * j] = code[p[j] >> 4] * s;
        dst[2 * j + 1] = code[p[j] & 15] * s;
    }
#endif
}

static uint16_t to_bf16(float f) {  /* round to nearest even, as torch; NaN -> torch's quiet NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    return (u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0 : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static void store(const float *src, void *out, int64_t at, int n, int dtype) {
    if (dtype == 0) {
        memcpy((float *)out + at, src, (size_t)n * 4);
    } else if (dtype == 1) {
        uint16_t *d = (uint16_t *)out + at;
        for (int i = 0; i < n; i++) d[i] = to_bf16(src[i]);
    } else {
        _Float16 *d = (_Float16 *)out + at;
        for (int i = 0; i < n; i++) d[i] = (_Float16)src[i];
    }
}

/* Blocks [first, last) of `block` codes each: out[k * block + i] = code[nibble i of block k] * scales[k].
   dtype 0: float32, 1: bfloat16, 2: float16. `block` is even. */
void nf4_decode(const uint8_t *packed, const float *scales, const float *code, int64_t first, int64_t last,
                int64_t block, void *out, int dtype) {
    float tmp[32];
    for (int64_t k = first; k < last; k++) {
        const uint8_t *p = packed + k * block / 2;
        int64_t i = 0;
        for (; i + 32 <= block; i += 32) {
            lookup32(p + i / 2, code, scales[k], tmp);
            store(tmp, out, k * block + i, 32, dtype);
        }
        for (; i < block; i += 2) {
            tmp[0] = code[p[i / 2] >> 4] * scales[k];
            tmp[1] = code[p[i / 2] & 15] * scales[k];
            store(tmp, out, k * block + i, 2, dtype);
        }
    }
}
"""

DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c11")


class KernelUnavailable(RuntimeError):
    """The kernel cannot be built here (no C compiler, or it failed); nf4 falls back to another path."""


def _cache() -> Path:
    return Path(os.environ.get("LORAKIT_CACHE") or Path.home() / ".cache" / "lorakit") / "kernels"


def _cpu_key() -> str:
    # -march=native code is only valid on a CPU like this one: the CPU's model and flags are part of the key
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() or platform.machine()


def build(flags: tuple[str, ...] = FLAGS) -> Path:
    """The compiled kernel (a shared library) for `flags`, compiled once into the cache folder, written atomically."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise KernelUnavailable("no C compiler (set CC, or install gcc)")
    key = hashlib.sha256("\0".join([SOURCE, compiler, *flags, _cpu_key()]).encode()).hexdigest()[:16]
    target = _cache() / f"nf4_decode-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, lib = Path(tmp) / "nf4_decode.c", Path(tmp) / "nf4_decode.so"
        src.write_text(SOURCE)
        try:
            done = subprocess.run([compiler, *flags, str(src), "-o", str(lib)], capture_output=True, text=True,
                                  timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise KernelUnavailable(f"{compiler}: {e}") from None
        if done.returncode != 0:
            raise KernelUnavailable(f"{compiler} failed: {(done.stderr.strip().splitlines() or ['?'])[0]}")
        os.replace(lib, target)
    return target


@functools.cache
def kernel(flags: tuple[str, ...] = FLAGS):
    """The loaded `nf4_decode` C function for `flags` (built on first use)."""
    fn = ctypes.CDLL(str(build(flags))).nf4_decode
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    fn.restype = None
    return fn


@functools.cache
def _pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="lorakit-nf4")


def decode(packed: torch.Tensor, scales: torch.Tensor, code: torch.Tensor, block: int, dtype: torch.dtype,
           flags: tuple[str, ...] = FLAGS) -> torch.Tensor:
    """(n_blocks · block,) values code[nibble] · scales[block] in dtype from CPU tensors packed (uint8), scales and
    code (float32), the blocks split across torch's thread count."""
    if dtype not in DTYPES:
        raise KernelUnavailable(f"the C kernel writes {[str(d) for d in DTYPES]}, not {dtype}")
    fn, n_blocks = kernel(flags), scales.numel()
    packed, scales, code = packed.contiguous(), scales.float().contiguous(), code.float().contiguous()
    out = _lend(n_blocks * block * dtype.itemsize).view(dtype)
    args = (packed.data_ptr(), scales.data_ptr(), code.data_ptr())
    threads = max(1, min(torch.get_num_threads(), n_blocks // 1024))  # small weights: one thread
    cuts = [n_blocks * t // threads for t in range(threads + 1)]
    calls = [(*args, cuts[t], cuts[t + 1], block, out.data_ptr(), DTYPES[dtype]) for t in range(threads)]
    if threads == 1:
        fn(*calls[0])
    else:
        list(_pool(threads).map(lambda call: fn(*call), calls))
    return out


_free: dict[int, list[np.ndarray]] = {}  # nbytes -> buffers no tensor uses
_lock = threading.RLock()  # reentrant: a finalizer may run while this thread holds it


def _lend(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of nbytes from the pool (a new buffer if none is free); back in the pool once freed: the tensor
    holds a fresh numpy view of the buffer, whose end (when torch frees the storage) returns the buffer."""
    with _lock:
        spare = _free.get(nbytes)
        buffer = spare.pop() if spare else None
    if buffer is None:  # allocated outside the lock: a garbage collection here may run _give_back
        buffer = np.empty(nbytes, np.uint8)
    view = buffer[:]
    weakref.finalize(view, _give_back, nbytes, buffer)
    return torch.from_numpy(view)


def _give_back(nbytes: int, buffer: np.ndarray) -> None:
    with _lock:
        _free.setdefault(nbytes, []).append(buffer)
