//! The unfused baseline every speedup is quoted against: what an engine without a fused kernel
//! does. Scores are materialised per head (`S = scale * Q K^T`), masked, softmaxed row by row,
//! then multiplied by V. Loops are ordered so the compiler vectorises them; no SIMD intrinsics.
//! Supports the options the sweep uses (causal, GQA, kv length = seq_kv).

use simd_attn::AttentionShape;

pub fn attention(shape: &AttentionShape, causal: bool, q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], scores: &mut Vec<f32>) {
    let s = shape;
    let (d, dv, sq, skv) = (s.head_dim, s.v_head_dim, s.seq_q, s.seq_kv);
    let scale = 1.0 / (d as f32).sqrt();
    let group = s.q_heads / s.kv_heads;
    let pitch = skv + 16; // one line of padding keeps the transposed rows out of each other's L1 sets
    let mut kt = vec![0.0f32; d * pitch];
    scores.resize(sq * skv, 0.0);
    for b in 0..s.batch {
        for h in 0..s.q_heads {
            let hk = h / group;
            let qh = &q[((b * s.q_heads + h) * sq) * d..][..sq * d];
            let kh = &k[((b * s.kv_heads + hk) * skv) * d..][..skv * d];
            let vh = &v[((b * s.kv_heads + hk) * skv) * dv..][..skv * dv];
            let oh = &mut out[((b * s.q_heads + h) * sq) * dv..][..sq * dv];
            for j0 in (0..skv).step_by(16) {
                for j in j0..(j0 + 16).min(skv) {
                    for t in 0..d {
                        kt[t * pitch + j] = kh[j * d + t];
                    }
                }
            }
            for i in 0..sq {
                let row = &mut scores[i * skv..(i + 1) * skv];
                row.fill(0.0);
                for t in 0..d {
                    let qv = qh[i * d + t] * scale;
                    for (x, &kv) in row.iter_mut().zip(&kt[t * pitch..t * pitch + skv]) {
                        *x += qv * kv;
                    }
                }
                let visible = if causal { (i + skv).saturating_sub(sq) + 1 } else { skv }.min(skv);
                row[visible..].fill(f32::NEG_INFINITY);
                let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0;
                for x in row.iter_mut() {
                    *x = if m == f32::NEG_INFINITY { 0.0 } else { (*x - m).exp() };
                    sum += *x;
                }
                let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
                let o = &mut oh[i * dv..(i + 1) * dv];
                o.fill(0.0);
                for (j, &p) in row.iter().enumerate() {
                    for (a, &vv) in o.iter_mut().zip(&vh[j * dv..(j + 1) * dv]) {
                        *a += p * vv;
                    }
                }
                o.iter_mut().for_each(|a| *a *= inv);
            }
        }
    }
}
