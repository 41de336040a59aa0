"""flash2 register-blocking experiment: ``python -m gpu.tune --out FILE``.

Times flash2 variants (BR, BC, WM = 16-row m-tiles per warp, QREG = Q fragments kept in registers) at the
target shape (B=8, H=16, N=4096, d 64/128, causal and not) after checking each against the float64 reference,
also on N=200 (tails). Writes a JSON with every variant's median time and error.
"""
from __future__ import annotations

import argparse
import math
import time

from . import bench as BN, kernels as K, reference as R, schema as S

VARIANTS = {
    64: [(128, 128, 1, 1), (64, 128, 1, 1), (128, 64, 1, 1), (128, 64, 2, 1), (128, 64, 2, 0), (128, 128, 2, 0),
         (64, 64, 2, 1), (128, 32, 2, 1)],
    128: [(128, 64, 1, 1), (64, 64, 1, 1), (128, 64, 2, 1), (128, 64, 2, 0), (128, 32, 2, 0), (128, 32, 2, 1),
          (64, 64, 2, 0)],
}


def main(argv=None) -> int:
    import cupy as cp

    ap = argparse.ArgumentParser(prog="python -m gpu.tune")
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--deadline-s", type=float, default=200)
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    # compile every variant in parallel processes first (fills CuPy's kernel cache)
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp
    vs = set()
    for d, lst in VARIANTS.items():
        for br, bc, wm, qreg in lst:
            defs = {"HEAD_DIM": d, "BR": br, "BC": bc}
            if (wm, qreg) != (1, 1):
                defs.update({"WM": wm, "QREG": qreg})
            vs.add(("flash2.cu", "flash2_fwd", tuple(sorted(defs.items()))))
    with ProcessPoolExecutor(max_workers=14, mp_context=mp.get_context("spawn")) as ex:
        list(ex.map(BN._compile_one, sorted(vs)))
    print(f"compiled {len(vs)} variants in {time.monotonic() - t0:.1f}s", flush=True)
    rows = []
    for d in (64, 128):
        for causal in (False, True):
            for shape in (dict(batch=2, heads=4, seq_len=200, head_dim=d, causal=causal),
                          dict(batch=8, heads=16, seq_len=4096, head_dim=d, causal=causal)):
                if time.monotonic() - t0 > args.deadline_s:
                    break
                B, H, N = shape["batch"], shape["heads"], shape["seq_len"]
                sets = BN.make_inputs(shape, 3, seed=99 + N + d)
                q, k, v = sets[0]
                ref = R.attention_reference(q, k, v, causal, xp=cp)
                e16 = R.rel_error(R.attention_fp16_plain(q, k, v, causal, xp=cp), ref, xp=cp) if N < 1000 else None
                if e16 is None:
                    import torch
                    tp = BN._TorchPipe("torch_plain", shape)
                    out = cp.empty((B, H, N, d), dtype=cp.float16)
                    tp.run(q, k, v, out)
                    cp.cuda.runtime.deviceSynchronize()
                    e16 = R.rel_error(out, ref, xp=cp)
                flops = S.attention_flops(B, H, N, d, causal)
                out = cp.empty((B, H, N, d), dtype=cp.float16)
                for br, bc, wm, qreg in VARIANTS[d]:
                    rec = dict(shape, block_rows=br, block_cols=bc, wm=wm, qreg=qreg)
                    try:
                        p = K.make_pipeline("flash2", (B, H, N, d), causal, br, bc, wm=wm, qreg=qreg)
                        out.fill(float("nan"))
                        p.run(q, k, v, out)
                        cp.cuda.runtime.deviceSynchronize()
                        rec.update(R.check_error(R.rel_error(out, ref, xp=cp), e16))
                        if N >= 1000:
                            t, _ = BN.time_pipeline(p, sets, out, 3, args.repeats)
                            rec["time_s"] = t
                            rec["tflops"] = flops / t["median"] / 1e12
                        p.free()
                    except Exception as e:  # noqa: BLE001
                        rec["error"] = repr(e)[:500]
                    rows.append(rec)
                    print(f"d={d} causal={int(causal)} N={N} ({br},{bc}) WM={wm} QREG={qreg}: "
                          f"err={rec.get('rel_error')} pass={rec.get('passed')} "
                          f"{rec.get('tflops', float('nan')):.1f} TFLOP/s {rec.get('error', '')}", flush=True)
                del sets, ref
                BN._free_pools()
    S.write_json_atomic(args.out, {"schema": "iosim-gpu-tune/1", "date": BN.now_iso(), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
