//! Additive (Bahdanau) attention between a source and a target sentence, and its alignment
//! matrix drawn as an SVG heatmap with the tokens on the axes.
//!
//! ```text
//! cargo run --release --example alignment [OUT.svg]      (default: examples/alignment.svg)
//! ```
//!
//! No trained model ships with a kernel library, so the encoder and decoder states are built by
//! hand the way a trained seq2seq model's tend to look: each target token's decoder state is
//! close to the encoder state of the source word it translates (word embedding plus a position
//! signal, so the two "the" are told apart). The score is the real additive one,
//! `e = v^T tanh(W_q q + W_k k)`, with weights that make it peak where the states agree:
//! for every state dimension `a` two attention units compute `tanh(c + s(x_a - y_a))` and
//! `tanh(c - s(x_a - y_a))`, whose sum is a bump centred on `x_a = y_a`. The library computes
//! the fused attention and then, in its second pass, the exact probabilities.

use simd_attn::{attention_inspect, AdditiveProjection, AttentionParams, AttentionShape, Inspect, RunConfig, Score, Strides, TensorMut, TensorRef};
use std::fmt::Write;

const SOURCE: [&str; 7] = ["the", "black", "cat", "sat", "on", "the", "mat"];
/// Each target token and the source position it translates.
const TARGET: [(&str, usize); 8] = [("le", 0), ("chat", 2), ("noir", 1), ("était", 3), ("assis", 3), ("sur", 4), ("le", 5), ("tapis", 6)];
/// Width of the encoder and decoder states.
const E: usize = 24;

/// A deterministic pseudo-random value in [-1, 1).
fn noise(seed: u64) -> f32 {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    ((x >> 40) as f32 / (1u64 << 23) as f32) - 1.0
}

/// The encoder state of source position `j`: its word's embedding plus a position signal.
fn encoder_state(j: usize) -> Vec<f32> {
    let word = SOURCE[j];
    let word_seed = word.bytes().fold(7u64, |h, b| h.wrapping_mul(131).wrapping_add(b as u64));
    (0..E)
        .map(|a| {
            let pos = if a % 2 == 0 { (j as f32 * 0.7 + a as f32).sin() } else { (j as f32 * 0.7 + a as f32).cos() };
            noise(word_seed + a as u64) + 0.35 * pos
        })
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_path = std::env::args().nth(1).unwrap_or_else(|| "examples/alignment.svg".into());
    let (s_src, s_tgt) = (SOURCE.len(), TARGET.len());

    // Keys and values: the encoder states [1, 1, S_src, E].
    let keys: Vec<f32> = (0..s_src).flat_map(encoder_state).collect();
    // Queries: decoder states, close to the aligned encoder state, plus a constant 1 (the
    // projection's bias input): [1, 1, S_tgt, E + 1].
    let q_dim = E + 1;
    let mut queries = Vec::new();
    for (i, &(_, j)) in TARGET.iter().enumerate() {
        let y = encoder_state(j);
        queries.extend(y.iter().enumerate().map(|(a, &ya)| ya + 0.25 * noise(1000 + (i * E + a) as u64)));
        queries.push(1.0);
    }

    // W_q [2E, E + 1], W_k [2E, E], v [2E]: unit 2a gets c + s x_a - s y_a, unit 2a + 1 gets
    // c - s x_a + s y_a.
    let (s, c) = (2.5f32, 1.5f32);
    let a_dim = 2 * E;
    let mut w_q = vec![0.0f32; a_dim * q_dim];
    let mut w_k = vec![0.0f32; a_dim * E];
    for a in 0..E {
        w_q[(2 * a) * q_dim + a] = s;
        w_q[(2 * a) * q_dim + E] = c;
        w_q[(2 * a + 1) * q_dim + a] = -s;
        w_q[(2 * a + 1) * q_dim + E] = c;
        w_k[(2 * a) * E + a] = -s;
        w_k[(2 * a + 1) * E + a] = s;
    }
    // The scale of v sets how peaked the softmax is: a real model learns it.
    let v = vec![0.22f32; a_dim];

    let shape = AttentionShape::new(1, 1, 1, s_tgt, s_src, E);
    let [_, ks, vs, os] = shape.bhsd_strides();
    let qs = Strides::bhsd(1, s_tgt, q_dim);
    let mut context = vec![0.0f32; s_tgt * E];
    let mut alignment = vec![0.0f32; s_tgt * s_src];
    let mut coverage = vec![0.0f32; s_src];
    let params = AttentionParams::new().score(Score::Additive { v: &v, projection: Some(AdditiveProjection { w_q: &w_q, w_k: &w_k, q_dim }) });
    let info = attention_inspect(
        &RunConfig::default(),
        &shape,
        TensorRef::new(&queries, qs),
        TensorRef::new(&keys, ks),
        TensorRef::new(&keys, vs),
        TensorMut::new(&mut context, os),
        None,
        &params,
        Inspect { alignment: Some(&mut alignment), coverage: Some(&mut coverage) },
    )?;

    println!("additive attention on {} ({} threads); alignment (rows: target, columns: source):", info.isa, info.threads);
    print!("{:>8}", "");
    for w in SOURCE {
        print!("{w:>7}");
    }
    println!();
    for (i, (w, _)) in TARGET.iter().enumerate() {
        print!("{w:>8}");
        for j in 0..s_src {
            print!("{:>7.3}", alignment[i * s_src + j]);
        }
        println!();
    }
    print!("{:>8}", "coverage");
    for c in &coverage {
        print!("{c:>7.2}");
    }
    println!();

    std::fs::write(&out_path, heatmap(&alignment, &SOURCE, &TARGET.map(|t| t.0), "additive attention: alignment matrix"))?;
    println!("wrote {out_path}");
    Ok(())
}

/// An SVG heatmap: one cell per (target row, source column), darker for more attention, the
/// probability written in each cell.
fn heatmap(p: &[f32], cols: &[&str], rows: &[&str], title: &str) -> String {
    let (cell, left, top) = (56.0, 80.0, 96.0);
    let (w, h) = (left + cell * cols.len() as f64 + 24.0, top + cell * rows.len() as f64 + 24.0);
    let mut svg = String::new();
    let _ = writeln!(svg, r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="14">"#);
    let _ = writeln!(svg, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(svg, r#"<text x="{}" y="22" text-anchor="middle" font-size="16">{title}</text>"#, w / 2.0);
    for (j, c) in cols.iter().enumerate() {
        let x = left + cell * (j as f64 + 0.5);
        let _ = writeln!(svg, r#"<text x="{x}" y="{}" text-anchor="start" transform="rotate(-40 {x} {})">{c}</text>"#, top - 10.0, top - 10.0);
    }
    for (i, r) in rows.iter().enumerate() {
        let y = top + cell * (i as f64 + 0.5) + 5.0;
        let _ = writeln!(svg, r#"<text x="{}" y="{y}" text-anchor="end">{r}</text>"#, left - 8.0);
        for j in 0..cols.len() {
            let v = p[i * cols.len() + j].clamp(0.0, 1.0) as f64;
            // White to deep blue.
            let shade = |lo: f64, hi: f64| (lo + (hi - lo) * v).round() as u8;
            let (x0, y0) = (left + cell * j as f64, top + cell * i as f64);
            let _ = writeln!(
                svg,
                r##"<rect x="{x0}" y="{y0}" width="{cell}" height="{cell}" fill="#{:02x}{:02x}{:02x}" stroke="#ddd"/>"##,
                shade(255.0, 8.0),
                shade(255.0, 48.0),
                shade(255.0, 107.0)
            );
            let ink = if v > 0.5 { "white" } else { "#333" };
            let _ = writeln!(svg, r#"<text x="{}" y="{}" text-anchor="middle" font-size="12" fill="{ink}">{v:.2}</text>"#, x0 + cell / 2.0, y0 + cell / 2.0 + 4.0);
        }
    }
    svg.push_str("</svg>\n");
    svg
}
