#!/usr/bin/env python3
"""Peers on the bench's standard prefill shapes: ONNX Runtime's CPU attention operators and,
when it is installed, PyTorch's scaled_dot_product_attention, timed the way simd-attn-bench
times itself (warm-up, then repeats for at least --min-time seconds; median, best and spread),
with the same thread counts, written as results that `simd-attn-bench compare` reads next to
ours. Not part of `cargo test` or CI.

    pip install onnxruntime onnx numpy            # torch is optional
    python3 benches/peers.py --threads 1,2 --json peers.json
    cargo run --release --bin simd-attn-bench -- --set standard --threads 1,2 --json ours.json
    cargo run --release --bin simd-attn-bench -- compare peers.json ours.json

Operators (each on its own native layout, [B, S, H*D] for ONNX Runtime, [B, H, S, D] for
PyTorch; the layout conversion is not timed):
  - onnxruntime-Attention:          the ONNX `Attention` op (opset 23), GQA by q/kv_num_heads;
  - onnxruntime-MultiHeadAttention: com.microsoft; K/V repeated to every query head for GQA
                                    shapes beforehand (its best case), causal by a -inf bias;
  - onnxruntime-GroupQueryAttention: com.microsoft, causal shapes only (the op is causal);
  - torch-sdpa:                     F.scaled_dot_product_attention (enable_gqa for GQA).
An operator this onnxruntime build lacks (or that fails on a shape) is reported and skipped.
Every output is checked against an f64 reference on sampled rows (column max_err), so a row
never times a misconfigured call. GFLOP/s counts 2*(D+Dv) flops per visible pair and head,
as the bench does.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

# (case, batch, q_heads, kv_heads, seq, head_dim, causal, dtype): the bench's standard prefill
# rows (`--set standard`), named as it names them.
SHAPES = [
    ("prefill", 1, 8, 8, 1024, 128, False, "f32"),
    ("prefill-d64", 1, 8, 8, 1024, 64, False, "f32"),
    ("prefill-gqa", 1, 8, 2, 2048, 128, True, "f32"),
    ("generic-d96", 1, 8, 8, 1024, 96, False, "f32"),
    ("prefill-gqa", 1, 8, 2, 2048, 128, True, "f16"),
]


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def flops(b, hq, s, d, causal):
    pairs = s * (s + 1) // 2 if causal else s * s
    return 2.0 * (d + d) * pairs * b * hq


def time_call(fn, reps, min_time):
    fn()
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < reps or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2], times[0], times[-1] / times[0] - 1.0


def reference_rows(q, k, v, causal, rows):
    """f64 attention for query rows `rows` of every head: q [B, Hq, S, D], k/v [B, Hkv, S, D]."""
    b, hq, s, d = q.shape
    g = hq // k.shape[1]
    out = np.zeros((b, hq, len(rows), d))
    for bi in range(b):
        for h in range(hq):
            kk, vv = k[bi, h // g].astype(np.float64), v[bi, h // g].astype(np.float64)
            for n, i in enumerate(rows):
                sc = kk @ q[bi, h, i].astype(np.float64) / np.sqrt(d)
                if causal:
                    sc[i + 1:] = -np.inf
                w = np.exp(sc - sc.max())
                out[bi, h, n] = (w / w.sum()) @ vv
    return out


def max_error(got_bhsd, ref, rows):
    got = got_bhsd[:, :, rows, :].astype(np.float64)
    return float(np.max(np.abs(got - ref) / (1.0 + np.abs(ref))))


def ort_ops():
    """(name, builder) for every ONNX Runtime operator; a builder returns (model, feeds-maker)."""
    from onnx import TensorProto, helper

    def model(node, inputs, out_shape, elem, opsets):
        graph = helper.make_graph(
            [node],
            "attention",
            [helper.make_tensor_value_info(n, t, shp) for n, t, shp in inputs],
            [helper.make_tensor_value_info("out", elem, out_shape)],
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets], ir_version=10)

    def attention(b, hq, hkv, s, d, causal, elem):
        node = helper.make_node("Attention", ["q", "k", "v"], ["out"], q_num_heads=hq, kv_num_heads=hkv, is_causal=int(causal))
        ins = [("q", elem, [b, s, hq * d]), ("k", elem, [b, s, hkv * d]), ("v", elem, [b, s, hkv * d])]
        m = model(node, ins, [b, s, hq * d], elem, [("", 23)])
        return m, lambda q, k, v: {"q": q, "k": k, "v": v}

    def mha(b, hq, hkv, s, d, causal, elem):
        names = ["q", "k", "v", "", "", "bias"] if causal else ["q", "k", "v"]
        node = helper.make_node("MultiHeadAttention", names, ["out"], domain="com.microsoft", num_heads=hq)
        ins = [("q", elem, [b, s, hq * d]), ("k", elem, [b, s, hq * d]), ("v", elem, [b, s, hq * d])]
        if causal:
            ins.append(("bias", elem, [1, 1, s, s]))
        m = model(node, ins, [b, s, hq * d], elem, [("", 21), ("com.microsoft", 1)])
        g = hq // hkv
        dt = np.float16 if elem == TensorProto.FLOAT16 else np.float32
        bias = np.triu(np.full((s, s), -np.inf, dtype=np.float32), 1).astype(dt)[None, None]

        def feeds(q, k, v):
            rep = lambda x: np.repeat(x.reshape(b, s, hkv, d), g, axis=2).reshape(b, s, hq * d)
            f = {"q": q, "k": rep(k), "v": rep(v)}
            if causal:
                f["bias"] = bias
            return f

        return m, feeds

    def gqa(b, hq, hkv, s, d, causal, elem):
        if not causal:
            return None
        names = ["q", "k", "v", "", "", "seqlens_k", "total_len"]
        node = helper.make_node("GroupQueryAttention", names, ["out", "present_k", "present_v"], domain="com.microsoft", num_heads=hq, kv_num_heads=hkv)
        ins = [("q", elem, [b, s, hq * d]), ("k", elem, [b, s, hkv * d]), ("v", elem, [b, s, hkv * d]),
               ("seqlens_k", TensorProto.INT32, [b]), ("total_len", TensorProto.INT32, [])]
        graph = helper.make_graph(
            [node],
            "attention",
            [helper.make_tensor_value_info(n, t, shp) for n, t, shp in ins],
            [helper.make_tensor_value_info("out", elem, [b, s, hq * d]),
             helper.make_tensor_value_info("present_k", elem, None),
             helper.make_tensor_value_info("present_v", elem, None)],
        )
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)], ir_version=10)
        lens = np.full((b,), s - 1, dtype=np.int32)
        total = np.array(s, dtype=np.int32)
        return m, lambda q, k, v: {"q": q, "k": k, "v": v, "seqlens_k": lens, "total_len": total}

    return [("onnxruntime-Attention", attention), ("onnxruntime-MultiHeadAttention", mha), ("onnxruntime-GroupQueryAttention", gqa)]


def row(case, b, hq, hkv, s, d, causal, dtype, isa, threads, timing, err, extra):
    ms, best, spread = timing
    f = flops(b, hq, s, d, causal)
    r = {
        "case": case, "batch": b, "q_heads": hq, "kv_heads": hkv, "seq_q": s, "seq_kv": s, "head_dim": d,
        "causal": "true" if causal else "false", "dtype": dtype, "isa": isa, "threads": threads,
        "ms": ms * 1e3, "best_ms": best * 1e3, "spread": spread,
        "gflops": f / ms / 1e9, "gflops_best": f / best / 1e9, "max_err": err,
    }
    r.update(extra)
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1", help="comma list of thread counts (default 1)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=0.5)
    ap.add_argument("--case", default="", help="only cases whose name contains this")
    ap.add_argument("--json", help="write the results here (simd-attn-bench compare reads it)")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]

    import onnxruntime as ort
    from onnx import TensorProto

    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        torch = None
        print("# torch is not installed: no torch-sdpa rows", file=sys.stderr)

    versions = {"onnxruntime": ort.__version__, "torch": torch.__version__ if torch else "not installed", "numpy": np.__version__}
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "isa_best": "peers", "crate_version": "peers " + json.dumps(versions),
               "git_commit": "-", "unix_time": int(time.time())}
    print(f"# peers | {machine['cpu']} | {versions}")
    print(f"{'case':<12} {'dtype':<5} {'causal':<6} {'op':<34} {'thr':>3} {'ms':>9} {'spread':>7} {'GFLOP/s':>8} {'max err':>8}")
    results = []
    rng = np.random.default_rng(1)
    for case, b, hq, hkv, s, d, causal, dtype in SHAPES:
        if args.case not in case:
            continue
        dt = np.float16 if dtype == "f16" else np.float32
        elem = TensorProto.FLOAT16 if dtype == "f16" else TensorProto.FLOAT
        q = rng.uniform(-1, 1, (b, hq, s, d)).astype(dt)
        k = rng.uniform(-1, 1, (b, hkv, s, d)).astype(dt)
        v = rng.uniform(-1, 1, (b, hkv, s, d)).astype(dt)
        sample = sorted({0, 1, s // 3, s // 2, s - 2, s - 1})
        ref = reference_rows(q, k, v, causal, sample)
        packed = lambda x: np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(b, s, -1))
        qp, kp, vp = packed(q), packed(k), packed(v)

        def report(isa, t, timing, out_bhsd, extra=None):
            err = max_error(out_bhsd, ref, sample)
            r = row(case, b, hq, hkv, s, d, causal, dtype, isa, t, timing, err, extra or {})
            results.append(r)
            print(f"{case:<12} {dtype:<5} {str(causal).lower():<6} {isa:<34} {t:>3} {r['ms']:>9.3f} {100 * r['spread']:>6.0f}% {r['gflops']:>8.1f} {err:>8.1e}")

        for name, build in ort_ops():
            made = build(b, hq, hkv, s, d, causal, elem)
            if made is None:
                continue
            m, feeds_of = made
            feeds = feeds_of(qp, kp, vp)
            for t in threads:
                so = ort.SessionOptions()
                so.intra_op_num_threads = t
                so.inter_op_num_threads = 1
                so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
                try:
                    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
                    out = sess.run(["out"], feeds)[0]
                except Exception as e:  # an op or a dtype this build lacks
                    print(f"# {name} {case} {dtype} t{t}: skipped ({str(e).splitlines()[0][:120]})", file=sys.stderr)
                    break
                timing = time_call(lambda: sess.run(["out"], feeds), args.reps, args.min_time)
                report(name, t, timing, out.reshape(b, s, hq, d).transpose(0, 2, 1, 3))

        if torch is not None:
            tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
            for t in threads:
                torch.set_num_threads(t)
                kw = {"enable_gqa": True} if hkv != hq else {}
                try:
                    call = lambda: F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal, **kw)
                    with torch.no_grad():
                        out = call().numpy()
                        timing = time_call(call, args.reps, args.min_time)
                except Exception as e:
                    print(f"# torch-sdpa {case} {dtype} t{t}: skipped ({str(e).splitlines()[0][:120]})", file=sys.stderr)
                    break
                report("torch-sdpa", t, timing, out)

    if args.json:
        with open(args.json, "w") as f:
            f.write("{\n")
            f.write(f'  "machine": {json.dumps(machine)},\n')
            f.write('  "results": [\n')
            f.write(",\n".join("    " + json.dumps(r) for r in results))
            f.write("\n  ]\n}\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
