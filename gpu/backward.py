"""The unfused standard attention backward on the GPU, checked and timed: ``python -m gpu.backward``.

Kernels (names as the simulator's ``iosim.schedules.standard.build_backward``), P saved by the forward pass:
  dv_gemm          dV = Pᵀ dO                     cuBLAS strided-batched GEMM (fp16 in/out, fp32 compute)
  dp_gemm          dP = dO Vᵀ                     cuBLAS
  softmax_backward dS = P ∘ (dP − rowsum(P ∘ dP))  row kernel in softmax.cu (one read of P, dP; one write of dS)
  dq_gemm          dQ = scale·dS K                cuBLAS (scale as alpha)
  dk_gemm          dK = scale·dSᵀ Q               cuBLAS (scale as alpha)
Correctness: dQ, dK, dV against a float64 gradient computed on the GPU per (b, h) slice; each must satisfy
rel_error <= 2 * (rel error of a plain fp16 autograd matmul-softmax-matmul on the same inputs) + 1e-4, all
elements finite (outputs poisoned with NaN first), two runs with identical error. Baselines (PyTorch): SDPA
forward + .backward() and plain autograd, timed around the backward only.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

from . import kernels as K
from . import reference as R

SCHEMA = "iosim-gpu-bench-backward/1"
KERNEL_NAMES = {"standard": ["dv_gemm", "dp_gemm", "softmax_backward", "dq_gemm", "dk_gemm"],
                "flash2": ["flash2_bwd_dot", "flash2_bwd", "flash2_bwd_convert"],
                # gpu/flash3_bwd.cu (Hopper: wgmma, TMA, warp specialisation)
                "flash3": ["flash3_bwd_dot", "flash3_bwd", "flash3_bwd_convert"]}
FUSED = ("flash2", "flash3")     # the fused backwards: O and L from the flash2 forward, dQ added with atomics
FLASH2_FWD_BLOCKS = (128, 64)   # (BR, BC) of the flash2 forward that produces O and L
FLASH2_BWD_BLOCKS = (None, None)  # (BR, BC) of flash2_bwd: None = kernels.FLASH2_BWD_DEFAULT_BLOCKS[d]
GRADS = ("dq", "dk", "dv")


# ----------------------------------------------------------------------------------------------- GEMMs
def dv_gemm(p, do, dv, alpha=1.0):
    """dV[b,h] = alpha * P[b,h]ᵀ dO[b,h]; p (B,H,N,N), do/dv (B,H,N,d)."""
    B, H, N, d = do.shape
    # row-major dV = Pᵀ dO  <=>  column-major dVᵀ (d x N) = dOᵀ P ; P (row-major) is Pᵀ column-major -> OP_T
    K.gemm_strided_batched(K.OP_N, K.OP_T, d, N, N, alpha, do, d, N * d, p, N, N * N, 0.0, dv, d, N * d, B * H)


def dq_gemm(ds, k, dq, alpha):
    """dQ[b,h] = alpha * dS[b,h] K[b,h]."""
    B, H, N, d = k.shape
    K.gemm_strided_batched(K.OP_N, K.OP_N, d, N, N, alpha, k, d, N * d, ds, N, N * N, 0.0, dq, d, N * d, B * H)


class StandardBackward:
    """The five backward kernels of the standard pipeline. ``run(q, k, v, do, P, dq, dk, dv, events=None)``."""

    def __init__(self, shape, causal=False):
        import cupy as cp

        self.B, self.H, self.N, self.d = shape
        self.causal = bool(causal)  # nothing to do: P is 0 where the forward masked
        self.scale = 1.0 / math.sqrt(self.d)
        self.kernel_names = list(KERNEL_NAMES["standard"])
        B, H, N = self.B, self.H, self.N
        self.dP = cp.empty((B, H, N, N), dtype=cp.float16)
        self.dS = cp.empty((B, H, N, N), dtype=cp.float16)
        self.tpr, self.vpt = K.softmax_launch_shape(N)
        self.cta = max(256, self.tpr)
        self.rows = B * H * N
        self.grid_rows = (self.rows + self.cta // self.tpr - 1) // (self.cta // self.tpr)
        self.k_bwd = K._raw_kernel("softmax.cu", "softmax_backward")

    def softmax_backward(self, P, dP, dS):
        import numpy as np

        self.k_bwd((self.grid_rows,), (self.cta,), (P, dP, dS, np.int64(self.rows), np.int32(self.N),
                                                     np.int32(self.tpr), np.int32(self.vpt)))

    def run(self, q, k, v, do, P, dq, dk, dv, events=None):
        rec = (lambda i: events[i].record()) if events is not None else (lambda i: None)
        rec(0)
        dv_gemm(P, do, dv); rec(1)
        K.qk_gemm(do, v, self.dP, 1.0); rec(2)          # dP = dO Vᵀ (same layout as S = Q Kᵀ)
        self.softmax_backward(P, self.dP, self.dS); rec(3)
        dq_gemm(self.dS, k, dq, self.scale); rec(4)
        dv_gemm(self.dS, q, dk, self.scale); rec(5)     # dK = scale dSᵀ Q (same layout as dV = Pᵀ dO)

    def free(self):
        self.dP = self.dS = None


class _FusedBackwardRun:
    """A fused backward kernel set (``impl``: run(q, k, v, o, L, do, dq, dk, dv, events), free(), br, bc,
    kernel_names) behind StandardBackward's ``run(q, k, v, do, saved, dq, dk, dv, events)``, ``saved`` = (O, L)
    from the flash2 forward."""

    def _adopt(self, impl, shape, ordered):
        self.impl = impl
        self.ordered = bool(ordered)
        self.B, self.H, self.N, self.d = shape
        self.block_rows, self.block_cols = impl.br, impl.bc
        self.kernel_names = list(impl.kernel_names)

    def run(self, q, k, v, do, saved, dq, dk, dv, events=None):
        o, L = saved
        self.impl.run(q, k, v, o, L, do, dq, dk, dv, events=events)

    def free(self):
        self.impl.free()


class Flash2BackwardRun(_FusedBackwardRun):
    """``kernels.Flash2Backward`` (mma.sync; ``ordered``: dQ added in a fixed order)."""

    def __init__(self, shape, causal=False, block_rows=None, block_cols=None, ordered=False, defines=None):
        cfg = flash2_config(shape[3]) if (block_rows, block_cols, defines) == (None, None, None) else None
        if cfg:   # IOSIM_FLASH2_BWD_CONFIG: the variant picked by --variants (run_backward.sh flash2)
            block_rows, block_cols, defines = cfg
        br, bc = block_rows or FLASH2_BWD_BLOCKS[0], block_cols or FLASH2_BWD_BLOCKS[1]
        self._adopt(K.Flash2Backward(shape, causal, br, bc, ordered=ordered, defines=defines), shape, ordered)


class Flash3BackwardRun(_FusedBackwardRun):
    """``flash3_bwd.Flash3Backward`` (Hopper). dQ: unordered fp32 atomics (``ordered`` is not built for flash3)."""

    def __init__(self, shape, causal=False, block_rows=None, block_cols=None, ordered=False, defines=None):
        from . import flash3_bwd as F3B

        if ordered:
            raise ValueError("flash3 backward: no ordered (deterministic) dQ mode")
        cfg = flash2_config(shape[3], "flash3") if (block_rows, defines) == (None, None) else None
        if cfg:   # IOSIM_FLASH3_BWD_CONFIG: the variant picked by --variants (run_backward.sh flash3)
            block_rows, block_cols, defines = cfg
        if block_cols not in (None, F3B.BLOCK_COLS):
            raise ValueError(f"flash3 backward is built for block_cols {F3B.BLOCK_COLS}, got {block_cols}")
        self._adopt(F3B.Flash3Backward(shape, causal, block_rows, defines=defines), shape, False)


CONFIG_ENV = {"flash2": "IOSIM_FLASH2_BWD_CONFIG", "flash3": "IOSIM_FLASH3_BWD_CONFIG"}


def flash2_config(head_dim, algorithm="flash2"):
    """(BR, BC, defines) for ``head_dim`` from the JSON file named by IOSIM_FLASH2_BWD_CONFIG (flash3:
    IOSIM_FLASH3_BWD_CONFIG) ({"64": [BR, BC, {defines}], ...}, written by ``--variants``), else None (the kernel
    object's defaults)."""
    path = os.environ.get(CONFIG_ENV[algorithm])
    if not path:
        return None
    import json

    with open(path) as f:
        cfg = json.load(f).get(str(head_dim))
    return (int(cfg[0]), int(cfg[1]), dict(cfg[2])) if cfg else None


def make_backward(algorithm, shape, causal, ordered=False, block_rows=None, block_cols=None, defines=None):
    if algorithm == "flash2":
        return Flash2BackwardRun(shape, causal, block_rows, block_cols, ordered=ordered, defines=defines)
    if algorithm == "flash3":
        return Flash3BackwardRun(shape, causal, block_rows, block_cols, ordered=ordered, defines=defines)
    return StandardBackward(shape, causal)


def forward_saved(algorithm, q, k, v, causal):
    """What the backward of ``algorithm`` reads from its forward: P (standard) or (O, L) (flash2)."""
    if algorithm in FUSED:
        return forward_flash2(q, k, v, causal)
    return forward_P(q, k, v, causal)[1]


def forward_flash2(q, k, v, causal):
    """Run the flash2 forward (BR, BC = FLASH2_FWD_BLOCKS); return (O, L)."""
    import cupy as cp

    pipe = K.make_pipeline("flash2", tuple(q.shape), causal, *FLASH2_FWD_BLOCKS)
    o = cp.empty_like(q)
    pipe.run(q, k, v, o)
    return o, pipe.L


def forward_P(q, k, v, causal):
    """Run the standard forward pipeline (qk_gemm, softmax, pv_gemm); return (O, P) with P its saved fp16 P."""
    import cupy as cp

    pipe = K.make_pipeline("standard", tuple(q.shape), causal)
    o = cp.empty_like(q)
    pipe.run(q, k, v, o)
    P = pipe.P
    pipe.S = None
    return o, P


# ------------------------------------------------------------------------------------------- references
def attention_backward_reference(q, k, v, do, causal, scale=None, xp=None):
    """float64 (dQ, dK, dV), one (b, h) slice at a time (on the GPU with xp=cupy)."""
    import numpy as np

    xp = xp or np
    B, H, N, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    outs = [xp.empty((B, H, N, d), dtype=xp.float64) for _ in range(3)]
    keep = xp.tril(xp.ones((N, N), dtype=bool)) if causal else None
    for b in range(B):
        for h in range(H):
            qq, kk, vv, gg = (x[b, h].astype(xp.float64) for x in (q, k, v, do))
            p = R.softmax_rows((qq @ kk.T) * scale, keep, xp)
            outs[2][b, h] = p.T @ gg
            dp = gg @ vv.T
            ds = p * (dp - (p * dp).sum(axis=1, keepdims=True))
            outs[0][b, h] = scale * (ds @ kk)
            outs[1][b, h] = scale * (ds.T @ qq)
            del p, dp, ds
    return tuple(outs)


def backward_fp16_plain(q, k, v, do, causal, scale=None, xp=None):
    """A plain fp16 autograd-style backward without PyTorch (S, P, dP, dS rounded to fp16, fp32 accumulation)."""
    import numpy as np

    xp = xp or np
    B, H, N, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    outs = [xp.empty((B, H, N, d), dtype=xp.float16) for _ in range(3)]
    keep = xp.tril(xp.ones((N, N), dtype=bool)) if causal else None
    f32, f16 = xp.float32, xp.float16
    for b in range(B):
        for h in range(H):
            qq, kk, vv, gg = (x[b, h].astype(f32) for x in (q, k, v, do))
            s = ((qq @ kk.T).astype(f16).astype(f32) * scale).astype(f16).astype(f32)
            p = R.softmax_rows(s, keep, xp).astype(f16).astype(f32)
            outs[2][b, h] = (p.T @ gg).astype(f16)
            dp = (gg @ vv.T).astype(f16).astype(f32)
            ds = (p * (dp - (p * dp).sum(axis=1, keepdims=True))).astype(f16).astype(f32)
            outs[0][b, h] = (scale * (ds @ kk)).astype(f16)
            outs[1][b, h] = (scale * (ds.T @ qq)).astype(f16)
    return tuple(outs)


def torch_plain_grads(q, k, v, do, causal):
    """PyTorch fp16 autograd of softmax(scale QKᵀ [mask]) V; returns CuPy (dQ, dK, dV)."""
    import cupy as cp
    import torch

    tq, tk, tv = (torch.from_dlpack(x).detach().clone().requires_grad_(True) for x in (q, k, v))
    tdo = torch.from_dlpack(do)
    o = _torch_plain_forward(tq, tk, tv, causal)
    o.backward(tdo)
    torch.cuda.synchronize()
    res = tuple(cp.from_dlpack(x.grad.detach()).copy() for x in (tq, tk, tv))
    del o, tq, tk, tv
    return res


def _torch_plain_forward(tq, tk, tv, causal):
    import torch

    N, d = tq.shape[-2], tq.shape[-1]
    s = torch.matmul(tq, tk.transpose(-1, -2)) * (1.0 / math.sqrt(d))
    if causal:
        s = s.masked_fill(torch.ones(N, N, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), tv)


# ------------------------------------------------------------------------------------------------ check
def check_backward(q, k, v, do, P, refs, fp16_errs, causal=False, algorithm="standard", ordered=False):
    """Run the backward twice with NaN-poisoned outputs; per-gradient error rule; identical errors.
    ``P`` is what the algorithm's forward saved (``forward_saved``)."""
    import cupy as cp

    B, H, N, d = q.shape
    bw = make_backward(algorithm, (B, H, N, d), causal, ordered)
    grads = [cp.empty((B, H, N, d), dtype=cp.float16) for _ in range(3)]
    errs = []
    for _ in range(2):
        for g in grads:
            g.fill(float("nan"))
        bw.run(q, k, v, do, P, grads[0], grads[1], grads[2])
        cp.cuda.runtime.deviceSynchronize()
        errs.append([R.rel_error(g, r, xp=cp) for g, r in zip(grads, refs)])
    bw.free()
    out = {}
    ok = True
    for i, name in enumerate(GRADS):
        c = R.check_error(errs[0][i], fp16_errs[i])
        stable = errs[0][i] == errs[1][i]
        c["stable_across_runs"] = bool(stable)
        c["passed"] = bool(c["passed"] and stable)
        ok = ok and c["passed"]
        out[name] = c
    return {"grads": out, "passed": bool(ok)}, grads


# ----------------------------------------------------------------------------------------------- timing
def _stats(ts):
    return {"median": statistics.median(ts), "min": min(ts), "max": max(ts), "n": len(ts)}


def time_backward(bw, sets, warmup, repeats):
    import cupy as cp

    B, H, N, d = bw.B, bw.H, bw.N, bw.d
    grads = [cp.empty((B, H, N, d), dtype=cp.float16) for _ in range(3)]
    nk = len(bw.kernel_names)
    totals, per = [], [[] for _ in range(nk)]
    for it in range(warmup + repeats):
        q, k, v, do, P = sets[it % len(sets)]
        ev = [cp.cuda.Event() for _ in range(nk + 1)]
        bw.run(q, k, v, do, P, *grads, events=ev)
        ev[-1].synchronize()
        if it >= warmup:
            totals.append(cp.cuda.get_elapsed_time(ev[0], ev[-1]) / 1e3)
            for i in range(nk):
                per[i].append(cp.cuda.get_elapsed_time(ev[i], ev[i + 1]) / 1e3)
    return _stats(totals), [{"name": n, "time_s": _stats(t)} for n, t in zip(bw.kernel_names, per)]


def time_torch(kind, sets, causal, warmup, repeats):
    """Backward-only time of a PyTorch baseline ('sdpa' or 'torch_plain'); forward run untimed each repeat."""
    import torch

    ts = []
    for it in range(warmup + repeats):
        q, k, v, do, _ = sets[it % len(sets)]
        tq, tk, tv = (torch.from_dlpack(x).detach().requires_grad_(True) for x in (q, k, v))
        tdo = torch.from_dlpack(do)
        if kind == "sdpa":
            o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
        else:
            o = _torch_plain_forward(tq, tk, tv, causal)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        o.backward(tdo)
        b.record()
        b.synchronize()
        if it >= warmup:
            ts.append(a.elapsed_time(b) / 1e3)
        del o, tq, tk, tv
    return _stats(ts)


def sdpa_grads(q, k, v, do, causal):
    import cupy as cp
    import torch

    tq, tk, tv = (torch.from_dlpack(x).detach().clone().requires_grad_(True) for x in (q, k, v))
    o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
    o.backward(torch.from_dlpack(do))
    torch.cuda.synchronize()
    return tuple(cp.from_dlpack(x.grad.detach()).copy() for x in (tq, tk, tv))


def sdpa_backend(q, k, v, causal):
    """Which SDPA backend runs (the first of flash, efficient, cudnn, math that accepts the inputs)."""
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel

        tq, tk, tv = (torch.from_dlpack(x[:1, :1]).detach().requires_grad_(True) for x in (q, k, v))
        for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                         ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)):
            try:
                with sdpa_kernel([be]):
                    torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
                return name + " (first accepting backend in flash, efficient, cudnn, math order; default policy)"
            except Exception:
                continue
    except Exception as e:  # noqa: BLE001
        return f"unknown ({type(e).__name__})"
    return "unknown"


# ------------------------------------------------------------------------------------------------ driver
def run_shape(shape, causal, args, log):
    import cupy as cp

    B, H, N, d = shape
    rs = cp.random.RandomState(args.seed + N + d)
    sets = []
    t0 = time.perf_counter()
    for _ in range(args.input_sets):
        q, k, v, do = (rs.standard_normal((B, H, N, d), dtype=cp.float32).astype(cp.float16) for _ in range(4))
        sets.append((q, k, v, do, forward_saved(args.algorithm, q, k, v, causal)))
    q, k, v, do, P = sets[0]
    refs = attention_backward_reference(q, k, v, do, causal, xp=cp)
    tgrads = torch_plain_grads(q, k, v, do, causal)
    fp16_errs = [R.rel_error(g, r, xp=cp) for g, r in zip(tgrads, refs)]
    del tgrads
    sgrads = sdpa_grads(q, k, v, do, causal)
    sdpa_errs = [R.rel_error(g, r, xp=cp) for g, r in zip(sgrads, refs)]
    del sgrads
    chk, _ = check_backward(q, k, v, do, P, refs, fp16_errs, causal, args.algorithm, args.ordered)
    del refs
    cp.get_default_memory_pool().free_all_blocks()
    bw = make_backward(args.algorithm, shape, causal, args.ordered)
    total, kern = time_backward(bw, sets, args.warmup, args.repeats)
    blocks = ({**bw.impl.resources(),
               "dq_accumulation": ("fp32 atomicAdd, K/V blocks in blockIdx.x order per Q block (deterministic)"
                                   if args.ordered else "fp32 atomicAdd, unordered (as FA2)")}
              if args.algorithm in FUSED else {})
    bw.free()
    cp.get_default_memory_pool().free_all_blocks()
    base = {}
    for kind in ("sdpa", "torch_plain"):
        try:
            base[kind] = {"time_s": time_torch(kind, sets, causal, args.warmup, args.repeats)}
        except Exception as e:  # noqa: BLE001 - e.g. out of memory
            base[kind] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    base["sdpa"]["backend"] = sdpa_backend(q, k, v, causal)
    base["sdpa"]["rel_errors"] = dict(zip(GRADS, sdpa_errs))
    base["torch_plain"]["rel_errors"] = dict(zip(GRADS, fp16_errs))
    flops = 8.0 * B * H * N * N * d * (0.5 if causal else 1.0)  # four GEMMs of 2·N²·d each
    run = {"algorithm": args.algorithm, "pass": "backward", **blocks,
           "batch": B, "heads": H, "seq_len": N, "head_dim": d,
           "causal": bool(causal), "passed": chk["passed"], "grads": chk["grads"],
           "rel_error_fp16_reference_source": "torch_plain (fp16 autograd of matmul-softmax-matmul)",
           "time_s": total, "tflops": flops / total["median"] / 1e12, "kernels": kern, "baselines": base,
           "elapsed_s": time.perf_counter() - t0}
    if args.algorithm in FUSED:
        run["saved_from_forward"] = (f"O and L from the flash2 forward (BR, BC = {FLASH2_FWD_BLOCKS}); "
                                     f"D = rowsum(dO o O) by {args.algorithm}_bwd_dot")
        run["tflops_5gemm"] = flops * 1.25 / total["median"] / 1e12  # + the recomputed S = Q Kᵀ
    sets.clear()
    import torch

    torch.cuda.empty_cache()
    cp.get_default_memory_pool().free_all_blocks()
    km = " ".join(f"{x['name']}={x['time_s']['median'] * 1e3:.3f}" for x in kern)
    bs = " ".join(f"{n}={b['time_s']['median'] * 1e3:.3f}" for n, b in base.items() if "time_s" in b)
    ge = " ".join(f"{g}={chk['grads'][g]['rel_error']:.2e}/{chk['grads'][g]['error_bound']:.2e}" for g in GRADS)
    tag = args.algorithm + (" ordered" if args.ordered else "")
    log(f"{tag} B={B} H={H} N={N} d={d} causal={causal} passed={chk['passed']} total={total['median'] * 1e3:.3f} ms "
        f"[{km}] baselines(ms) [{bs}] err/bound [{ge}] sdpa_err {['%.2e' % e for e in sdpa_errs]} "
        f"({run['elapsed_s']:.1f}s)")
    return run


def validate(doc) -> list[str]:
    """Problems of a bench_backward document (empty list when well-formed)."""
    errs = []
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        return ["schema is not " + SCHEMA]
    for key in ("date", "device", "settings", "runs"):
        if key not in doc:
            errs.append(f"missing {key}")
    if not isinstance(doc.get("device"), dict) or not doc["device"].get("name"):
        errs.append("device.name missing")

    def t_ok(t):
        return (isinstance(t, dict) and all(isinstance(t.get(x), (int, float)) for x in ("median", "min", "max", "n"))
                and 0 < t["min"] <= t["median"] <= t["max"] and t["n"] >= 10)

    for i, r in enumerate(doc.get("runs") or []):
        where = f"runs[{i}]"
        if r.get("algorithm") not in KERNEL_NAMES:
            errs.append(f"{where}: algorithm {r.get('algorithm')!r}")
            continue
        if [x.get("name") for x in r.get("kernels", [])] != KERNEL_NAMES[r["algorithm"]]:
            errs.append(f"{where}: kernel names {[x.get('name') for x in r.get('kernels', [])]}")
        for x in r.get("kernels", []):
            if not t_ok(x.get("time_s")):
                errs.append(f"{where}: kernel {x.get('name')} time_s")
        if not t_ok(r.get("time_s")):
            errs.append(f"{where}: time_s")
        g = r.get("grads") or {}
        for name in GRADS:
            c = g.get(name)
            if not isinstance(c, dict):
                errs.append(f"{where}: grads.{name} missing")
                continue
            ok = (c.get("rel_error") is not None and c["rel_error"] <= c.get("error_bound", -1)
                  and c.get("stable_across_runs") is True)
            if bool(c.get("passed")) != bool(ok):
                errs.append(f"{where}: grads.{name}.passed inconsistent")
        if bool(r.get("passed")) != all(bool((g.get(n) or {}).get("passed")) for n in GRADS):
            errs.append(f"{where}: passed inconsistent")
    if not doc.get("runs"):
        errs.append("no runs")
    return errs


# ------------------------------------------------------------------------------------------------ ncu
class _MarkerHook:
    """Stands in for a CUDA event in ``StandardBackward.run``: launches the marker kernel with ``tag``."""

    def __init__(self, tag):
        self.tag = tag

    def record(self):
        K.marker(self.tag)


NCU_SHAPES = [(8, 16, 4096, 64), (8, 16, 4096, 128), (8, 16, 1024, 64), (8, 16, 2048, 64)]


def ncu_child(manifest_path, seed):
    """Under ncu: per shape one warm-up backward, then one inside NVTX range iosim_prof with a marker
    (tag 8*r + i + 1) before each of the five kernels and a closing marker (tag 0)."""
    import json

    import cupy as cp
    from cupy.cuda import nvtx

    man = []
    for r, shape in enumerate(NCU_SHAPES):
        rs = cp.random.RandomState(seed + r)
        q, k, v, do = (rs.standard_normal(shape, dtype=cp.float32).astype(cp.float16) for _ in range(4))
        _, P = forward_P(q, k, v, False)
        bw = StandardBackward(shape, False)
        grads = [cp.empty(shape, dtype=cp.float16) for _ in range(3)]
        K.marker(0)
        bw.run(q, k, v, do, P, *grads)
        cp.cuda.runtime.deviceSynchronize()
        nvtx.RangePush("iosim_prof")
        hooks = [_MarkerHook(8 * r + i + 1) for i in range(5)] + [_MarkerHook(0)]
        bw.run(q, k, v, do, P, *grads, events=hooks)
        cp.cuda.runtime.deviceSynchronize()
        nvtx.RangePop()
        man.append({"shape": list(shape), "tags": [8 * r + i + 1 for i in range(5)]})
        bw.free()
        del P, q, k, v, do, grads
        cp.get_default_memory_pool().free_all_blocks()
    with open(manifest_path, "w") as f:
        json.dump(man, f)


def cmd_ncu(args):
    """Run ncu over ``ncu_child``; attach per-kernel DRAM bytes to the matching non-causal runs of --out."""
    import json
    import shutil
    import subprocess

    from . import ncu as NCU
    from .schema import write_json_atomic

    ncu = shutil.which("ncu") or "/usr/local/cuda/bin/ncu"
    csv_path, man_path = args.out + ".ncu.csv", args.out + ".manifest.json"
    cmd = [ncu, "--clock-control", "none", "--cache-control", "all", "--metrics", ",".join(NCU.METRICS),
           "--csv", "--print-units", "base", "--nvtx", "--nvtx-include", "iosim_prof/", "--log-file", csv_path,
           sys.executable, "-m", "gpu.backward", "--ncu-child", "--manifest", man_path, "--out", args.out]
    print("running: " + " ".join(cmd), flush=True)
    rc = subprocess.run(cmd).returncode
    kernels = NCU.parse_csv(open(csv_path).read())
    segs = NCU.segments(kernels)
    man = json.load(open(man_path))
    doc = json.load(open(args.out))
    n = 0
    for m in man:
        B, H, N, d = m["shape"]
        recs = []
        for name, tag in zip(KERNEL_NAMES["standard"], m["tags"]):
            ks = segs.get(tag, [])
            own = [x["base"] for x in ks if x["base"] == "softmax_backward"]
            if name == "softmax_backward" and not own:
                print(f"ncu: no softmax_backward in segment {tag}", flush=True)
            recs.append({"name": name, "launches": len(ks), "kernel_names": [x["name"][:120] for x in ks],
                         "dram_read_bytes": sum(x["dram_read_bytes"] or 0 for x in ks),
                         "dram_write_bytes": sum(x["dram_write_bytes"] or 0 for x in ks),
                         "ncu_duration_s": sum(x["duration_s"] or 0 for x in ks)})
            print(f"ncu {m['shape']} {name}: {recs[-1]['launches']} launches, read "
                  f"{recs[-1]['dram_read_bytes'] / 1e9:.3f} GB write {recs[-1]['dram_write_bytes'] / 1e9:.3f} GB "
                  f"{recs[-1]['ncu_duration_s'] * 1e3:.3f} ms", flush=True)
        for r in doc["runs"]:
            if (r["batch"], r["heads"], r["seq_len"], r["head_dim"], r["causal"]) == (B, H, N, d, False):
                for kr, rec in zip(r["kernels"], recs):
                    if rec["launches"]:
                        kr.update({k2: rec[k2] for k2 in ("dram_read_bytes", "dram_write_bytes", "ncu_duration_s",
                                                          "launches")})
                n += 1
    doc["settings"]["ncu"] = {"command": " ".join(cmd[:12]), "rc": rc, "cache_control": "all (flush before each "
                              "kernel)", "clock_control": "none", "runs_merged": n,
                              "note": "a flushed L2 is write-back: bytes left dirty in L2 at a kernel's end are "
                                      "not counted as its DRAM writes; reads are exact"}
    doc["schema_problems"] = validate(doc)
    write_json_atomic(args.out, doc)
    print(f"ncu: merged into {n} runs (rc {rc})", flush=True)
    return 0


# ------------------------------------------------------------------- flash2: variants, ncu, sanitizers
FLASH2_NCU_SHAPES = [((8, 16, 4096, 64), False), ((8, 16, 4096, 128), False),
                     ((8, 16, 4096, 64), True), ((8, 16, 4096, 128), True)]
FLASH2_SECTIONS = ("SpeedOfLight", "MemoryWorkloadAnalysis", "WarpStateStats", "Occupancy", "LaunchStats")
FLASH2_STALLS = ("barrier", "short_scoreboard", "long_scoreboard", "mio_throttle", "math_pipe_throttle", "wait",
                 "not_selected", "selected", "lg_throttle", "dispatch_stall", "no_instruction", "branch_resolving",
                 "membar", "sleeping", "tex_throttle", "drain", "misc", "imc_miss")
FLASH2_EXTRA_METRICS = tuple(f"smsp__average_warps_issue_stalled_{x}_per_issue_active.ratio" for x in FLASH2_STALLS) + (
    "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active", "smsp__inst_executed.sum",
    "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum", "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum",
    "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum", "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum")
# (BR, BC, extra defines) tried by --variants, per head dim; the first is the default of kernels.Flash2Backward
FLASH2_VARIANTS = {64: [(64, 128, {}), (64, 128, {"FUSE_SDP": 0}), (128, 128, {"P_F32": 0}),
                        (128, 128, {"KV_REGS": 0, "P_F32": 0})],
                   128: [(64, 128, {}), (64, 128, {"FUSE_SDP": 0}), (32, 128, {})]}


def fused_variants(algorithm):
    """The (BR, BC, defines) table --variants tries for ``algorithm`` (flash3: gpu.flash3_bwd.VARIANTS)."""
    if algorithm == "flash3":
        from . import flash3_bwd as F3B
        return F3B.variants_with_extra()
    return FLASH2_VARIANTS


def _rand_inputs(shape, seed):
    import cupy as cp

    rs = cp.random.RandomState(seed)
    return [rs.standard_normal(shape, dtype=cp.float32).astype(cp.float16) for _ in range(4)]


def flash2_variant_check(br, bc, defines, shape, causal, seed, ordered=False, algorithm="flash2"):
    """Float64-reference check of one (BR, BC, defines) variant of the ``algorithm`` (flash2 or flash3) backward on
    a small shape: the error rule per gradient."""
    import cupy as cp

    q, k, v, do = _rand_inputs(shape, seed)
    saved = forward_flash2(q, k, v, causal)
    refs = attention_backward_reference(q, k, v, do, causal, xp=cp)
    e16 = [R.rel_error(g, r, xp=cp) for g, r in zip(backward_fp16_plain(q, k, v, do, causal, xp=cp), refs)]
    bw = make_backward(algorithm, shape, causal, ordered, br, bc, defines)
    grads = [cp.full(shape, float("nan"), dtype=cp.float16) for _ in range(3)]
    bw.run(q, k, v, do, saved, *grads)
    cp.cuda.runtime.deviceSynchronize()
    res = {n: R.check_error(R.rel_error(g, r, xp=cp), e) for n, g, r, e in zip(GRADS, grads, refs, e16)}
    bw.free()
    return {"shape": list(shape), "causal": causal, "passed": all(c["passed"] for c in res.values()),
            "grads": res}


def pick_best_variants(results, algorithm="flash2"):
    """{str(d): [BR, BC, defines]}: per head dim the fastest ``algorithm`` variant whose small-shape checks all
    passed."""
    best = {}
    for d in sorted({r["head_dim"] for r in results if r.get("variant") == algorithm}):
        ok = [r for r in results if r.get("variant") == algorithm and r["head_dim"] == d and r.get("checks_passed")
              and "time_s" in r]
        if ok:
            r = min(ok, key=lambda x: x["time_s"]["median"])
            best[str(d)] = [r["block_rows"], r["block_cols"], r["defines"]]
    return best


def cmd_variants(args):
    """Each FLASH2_VARIANTS entry (flash3: flash3_bwd.VARIANTS): small-shape checks (N = 200, 256; causal and
    not), then the backward timed at (batch, heads, seq_lens[0], d) non-causal, SDPA's backward timed in the same
    process. JSON to --out."""
    alg = args.algorithm
    import json

    import cupy as cp

    from .bench import device_info, now_iso
    from .schema import write_json_atomic

    N = args.seq_lens[0]
    doc = {"date": now_iso(), "device": device_info(), "what": f"{alg} backward variants (gpu.backward --algorithm {alg} --variants)",
           "warmup": args.warmup, "repeats": args.repeats, "results": []}
    for d in args.head_dims:
        shape = (args.batch, args.heads, N, d)
        sets = []
        q, k, v, do = _rand_inputs(shape, args.seed + d)
        sets.append((q, k, v, do, forward_flash2(q, k, v, False)))
        sd = time_torch("sdpa", sets, False, args.warmup, args.repeats)
        doc["results"].append({"variant": "sdpa", "head_dim": d, "time_s": sd})
        print(f"d={d} sdpa bwd {sd['median'] * 1e3:.3f} ms", flush=True)
        for br, bc, defs in fused_variants(alg)[d]:
            rec = {"variant": alg, "head_dim": d, "block_rows": br, "block_cols": bc, "defines": defs}
            try:
                rec["checks"] = [flash2_variant_check(br, bc, defs, (1, 2, n, d), c, 11 + n + d, algorithm=alg)
                                 for n in (200, 256) for c in (False, True)]
                rec["checks_passed"] = all(x["passed"] for x in rec["checks"])
                if not rec["checks_passed"]:
                    print(f"d={d} BR={br} BC={bc} {defs} checks FAILED: " + "; ".join(
                        f"N={x['shape'][2]} causal={x['causal']} " + " ".join(
                            f"{n}={x['grads'][n]['rel_error']:.2e}/{x['grads'][n]['error_bound']:.2e}" for n in GRADS)
                        for x in rec["checks"]), flush=True)
                bw = make_backward(alg, shape, False, False, br, bc, defs)
                rec.update(bw.impl.resources())
                tot, kern = time_backward(bw, sets, args.warmup, args.repeats)
                bw.free()
                rec["time_s"], rec["kernels"] = tot, kern
                rec["vs_sdpa"] = sd["median"] / tot["median"]
                print(f"d={d} BR={br} BC={bc} {defs} regs={rec.get('registers')} local={rec.get('local_bytes')} "
                      f"checks={rec['checks_passed']} total={tot['median'] * 1e3:.3f} ms "
                      f"({rec['vs_sdpa']:.2f}x SDPA)", flush=True)
            except Exception as e:  # noqa: BLE001
                rec["error"] = f"{type(e).__name__}: {str(e)[:400]}"
                print(f"d={d} BR={br} BC={bc} {defs} FAILED {rec['error']}", flush=True)
            doc["results"].append(rec)
            write_json_atomic(args.out, doc)
        sets.clear()
        cp.get_default_memory_pool().free_all_blocks()
    best = pick_best_variants(doc["results"], alg)
    doc["best"] = best
    write_json_atomic(args.out, doc)
    write_json_atomic(args.out + ".best.json", best)
    print(json.dumps({"wrote": args.out, "best": best}), flush=True)
    return 0


def ncu_child_flash2(manifest_path, seed, ordered=False, algorithm="flash2"):
    """Under ncu: per FLASH2_NCU_SHAPES entry one warm-up ``algorithm`` backward, then one inside NVTX range
    iosim_prof."""
    import json

    import cupy as cp
    from cupy.cuda import nvtx

    man = []
    for r, (shape, causal) in enumerate(FLASH2_NCU_SHAPES):
        q, k, v, do = _rand_inputs(shape, seed + r)
        saved = forward_flash2(q, k, v, causal)
        bw = make_backward(algorithm, shape, causal, ordered)
        grads = [cp.empty(shape, dtype=cp.float16) for _ in range(3)]
        bw.run(q, k, v, do, saved, *grads)
        cp.cuda.runtime.deviceSynchronize()
        nvtx.RangePush("iosim_prof")
        bw.run(q, k, v, do, saved, *grads)
        cp.cuda.runtime.deviceSynchronize()
        nvtx.RangePop()
        man.append({"shape": list(shape), "causal": causal, **bw.impl.resources()})
        bw.free()
        del saved, q, k, v, do, grads
        cp.get_default_memory_pool().free_all_blocks()
    with open(manifest_path, "w") as f:
        json.dump(man, f)


def cmd_ncu_flash2(args):
    """ncu over ncu_child_flash2: DRAM bytes of the three flash2 (--algorithm flash3: flash3) backward kernels merged
    into the latest matching runs of that algorithm in --out (unordered); with --ncu-sections also the SpeedOfLight /
    memory / warp-state sections of the main kernel (one launch per shape) into doc['ncu_sections']."""
    alg = args.algorithm
    main_kernel = KERNEL_NAMES[alg][1]
    import json
    import shutil
    import subprocess

    from . import ncu as NCU
    from .schema import write_json_atomic

    ncu = shutil.which("ncu") or "/usr/local/cuda/bin/ncu"
    base = args.out + (".sections" if args.ncu_sections else "")
    csv_path, man_path = base + ".ncu.csv", base + ".manifest.json"
    what = ([["--section", x] for x in FLASH2_SECTIONS] + [["--metrics", ",".join(FLASH2_EXTRA_METRICS)]]
            if args.ncu_sections else [["--metrics", ",".join(NCU.METRICS)]])
    what = [w for pair in what for w in pair]
    kname = (f"regex:^{main_kernel}$" if args.ncu_sections
             else "regex:^(" + "|".join(KERNEL_NAMES[alg]) + ")$")
    cmd = [ncu, "--clock-control", "none", "--cache-control", "all", *what, "--kernel-name", kname,
           "--csv", "--print-units", "base", "--nvtx", "--nvtx-include", "iosim_prof/", "--log-file", csv_path,
           sys.executable, "-m", "gpu.backward", "--algorithm", alg, "--ncu-child", "--manifest", man_path,
           "--out", args.out]
    print("running: " + " ".join(cmd), flush=True)
    rc = subprocess.run(cmd).returncode
    text = open(csv_path).read()
    man = json.load(open(man_path))
    doc = json.load(open(args.out))
    if args.ncu_sections:
        ks = NCU.parse_metrics_csv(text)
        out = []
        for m, kr in zip(man, ks):
            out.append({**m, "kernel": kr["name"][:80], "metrics": kr["metrics"]})
            print(f"ncu sections {m['shape']} causal={m['causal']}: " + "; ".join(
                f"{k2}={v2}" for k2, v2 in kr["metrics"].items()), flush=True)
        doc["ncu_sections" if alg == "flash2" else f"ncu_sections_{alg}"] = {"command": " ".join(cmd[:20]), "rc": rc, "launches": out}
    else:
        ks = NCU.parse_csv(text)
        n = 0
        for i, m in enumerate(man):
            recs = ks[3 * i:3 * i + 3]
            if [x["base"] for x in recs] != KERNEL_NAMES[alg]:
                print(f"ncu: shape {m['shape']}: unexpected kernels {[x['base'] for x in recs]}", flush=True)
                continue
            B, H, N, d = m["shape"]
            for r in reversed(doc["runs"]):
                if (r["algorithm"] == alg and not r.get("dq_accumulation", "").startswith("fp32 atomicAdd, K/V")
                        and (r["batch"], r["heads"], r["seq_len"], r["head_dim"], r["causal"]) == (B, H, N, d,
                                                                                                 m["causal"])
                        and r.get("block_cols") == m["block_cols"] and r.get("block_rows") == m["block_rows"]):
                    for kr, rec in zip(r["kernels"], recs):
                        kr.update({"dram_read_bytes": rec["dram_read_bytes"],
                                   "dram_write_bytes": rec["dram_write_bytes"],
                                   "ncu_duration_s": rec["duration_s"], "launches": 1})
                    n += 1
                    print(f"ncu {m['shape']} causal={m['causal']}: " + ", ".join(
                        f"{x['base']} read {x['dram_read_bytes'] / 1e9:.3f} GB write {x['dram_write_bytes'] / 1e9:.3f}"
                        f" GB {x['duration_s'] * 1e3:.3f} ms" for x in recs), flush=True)
                    break
        doc["settings"][f"ncu_{alg}"] = {"command": " ".join(cmd[:14]), "rc": rc, "runs_merged": n,
                                         "cache_control": "all (flush before each kernel)", "clock_control": "none"}
    doc["schema_problems"] = validate(doc)
    write_json_atomic(args.out, doc)
    return 0


def sanitize_child_flash2(algorithm="flash2"):
    """Under compute-sanitizer: the flash2 (or flash3) backward on a small shape (B = 1, H = 2, N = 200: no whole
    block; d = 64, 128; causal and not; flash2: both dQ modes), CuPy's pool off so each array is its own
    allocation; prints one line per check."""
    import cupy as cp

    cp.cuda.set_allocator(None)
    ok = True
    for n in (200,):
        for d in (64, 128):
            for c in (False, True):
                for ordered in ((False, True) if algorithm == "flash2" else (False,)):
                    chk = flash2_variant_check(None, None, None, (1, 2, n, d), c, 5 + n + d, ordered=ordered,
                                               algorithm=algorithm)
                    ok &= chk["passed"]
                    print(f"SANITIZE_CHECK {KERNEL_NAMES[algorithm][1]} N={n} d={d} causal={c} ordered={ordered} "
                          f"passed={chk['passed']}", flush=True)
    return 0 if ok else 1


def cmd_sanitize_flash2(args):
    """compute-sanitizer memcheck and racecheck over sanitize_child_flash2 (--algorithm flash2 or flash3); summary
    into --out's settings."""
    import json
    import re
    import shutil
    import subprocess

    from .schema import write_json_atomic

    cs = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    res = []
    for tool in ("memcheck", "racecheck"):
        cmd = [cs, "--tool", tool, "--print-limit", "50", "--error-exitcode", "3",
               sys.executable, "-m", "gpu.backward", "--algorithm", args.algorithm, "--sanitize-child", "--out",
               args.out]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        txt = p.stdout + p.stderr
        summ = [ln for ln in txt.splitlines() if "ERROR SUMMARY" in ln or "RACECHECK SUMMARY" in ln]
        m = re.search(r"ERROR SUMMARY: (\d+) error", txt)
        checks = [ln for ln in txt.splitlines() if ln.startswith("SANITIZE_CHECK")]
        rec = {"tool": tool, "rc": p.returncode, "errors": int(m.group(1)) if m else None,
               "summary": summ[-3:], "checks": len(checks),
               "checks_passed": sum("passed=True" in ln for ln in checks), "wall_s": time.perf_counter() - t0}
        print(json.dumps(rec), flush=True)
        if p.returncode not in (0,):
            print(txt[-3000:], flush=True)
        res.append(rec)
    doc = json.load(open(args.out))
    doc["settings"][f"sanitizers_{args.algorithm}"] = {
        "shapes": "B=1, H=2, N=200, d in (64, 128), causal and not, " + (
            "ordered and unordered dQ" if args.algorithm == "flash2" else "unordered dQ") +
        f"; tiles as the {args.algorithm} runs (flash2_config)",
        "config": {str(d): flash2_config(d, args.algorithm) for d in (64, 128)}, "results": res}
    write_json_atomic(args.out, doc)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gpu.backward")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 1024, 2048])
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--algorithm", choices=sorted(KERNEL_NAMES), default="standard")
    ap.add_argument("--ordered", action="store_true",
                    help="flash2: deterministic dQ (K/V blocks take turns per Q block) instead of unordered atomics")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--input-sets", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--deadline-s", type=float, default=400)
    ap.add_argument("--append", action="store_true",
                    help="add the runs to --out's existing runs (same schema) instead of starting a new file")
    ap.add_argument("--ncu", action="store_true", help="profile with ncu and merge DRAM bytes into --out")
    ap.add_argument("--ncu-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--manifest", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--variants", action="store_true",
                    help="flash2/flash3: check and time FLASH2_VARIANTS / flash3_bwd.VARIANTS; JSON to --out")
    ap.add_argument("--ncu-sections", action="store_true",
                    help="flash2 with --ncu: SpeedOfLight/memory/warp-state sections of flash2_bwd instead of bytes")
    ap.add_argument("--sanitize", action="store_true",
                    help="flash2: compute-sanitizer memcheck + racecheck on small shapes; summary into --out")
    ap.add_argument("--sanitize-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.algorithm in FUSED:
        if args.variants:
            return cmd_variants(args)
        if args.sanitize_child:
            return sanitize_child_flash2(args.algorithm)
        if args.sanitize:
            return cmd_sanitize_flash2(args)
        if args.ncu_child:
            ncu_child_flash2(args.manifest, args.seed, algorithm=args.algorithm)
            return 0
        if args.ncu:
            return cmd_ncu_flash2(args)
    if args.ncu_child:
        ncu_child(args.manifest, args.seed)
        return 0
    if args.ncu:
        return cmd_ncu(args)
    from .bench import device_info, now_iso
    from .schema import write_json_atomic

    t0 = time.perf_counter()

    def log(m):
        print(f"[{time.perf_counter() - t0:7.1f}s] {m}", flush=True)

    doc = {"schema": SCHEMA, "date": now_iso(), "device": device_info(),
           "settings": {"dtype": "fp16", "accumulate": "fp32", "warmup": args.warmup, "repeats": args.repeats,
                        "input_sets": args.input_sets, "seed": args.seed,
                        "input_distribution": "standard normal (Q, K, V, dO), rounded to fp16",
                        "saved_from_forward": ("P from the standard forward pipeline (qk_gemm, softmax, pv_gemm)"
                                               if args.algorithm == "standard" else
                                               "O, L from the flash2 forward (per run: saved_from_forward)"),
                        "timer": "CUDA events around the backward and between its kernels; baselines: "
                                 "torch.cuda events around .backward() only (forward untimed, each repeat)",
                        "error_rule": "per gradient dQ, dK, dV: rel_error <= 2 * rel_error_fp16_reference + 1e-4, "
                                      "all elements finite (outputs NaN-poisoned), two runs with identical error",
                        "reference": "float64 analytic gradient on the GPU per (b, h) slice",
                        "tflops": "8*B*H*N^2*d (four GEMMs) over the median",
                        "nvrtc_options": K.compile_log(), "command": " ".join(sys.argv)},
           "runs": []}
    if args.append and os.path.exists(args.out):
        import json

        old = json.load(open(args.out))
        if old.get("schema") == SCHEMA:
            doc["runs"] = list(old["runs"])
            doc["settings"]["appended_to"] = {"date": old.get("date"), "device": old.get("device"),
                                              "command": old.get("settings", {}).get("command")}
    for N in args.seq_lens:
        for d in args.head_dims:
            if time.perf_counter() - t0 > args.deadline_s:
                log(f"deadline: skipping N={N} d={d}")
                continue
            try:
                doc["runs"].append(run_shape((args.batch, args.heads, N, d), args.causal, args, log))
            except Exception as e:  # noqa: BLE001
                log(f"N={N} d={d} FAILED: {type(e).__name__}: {e}")
            doc["elapsed_s"] = time.perf_counter() - t0
            doc["settings"]["nvrtc_options"] = K.compile_log()
            doc["schema_problems"] = validate(doc)
            write_json_atomic(args.out, doc)
    log(f"wrote {args.out}: {len(doc['runs'])} runs, problems {doc['schema_problems']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
