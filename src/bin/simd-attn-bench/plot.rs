//! `--plot out.svg`: GFLOP/s against sequence length, one line per path, written as plain SVG
//! (no plotting dependency). When every row is a decode row (Sq <= 16, bound by reading K/V)
//! the y axis is the fraction of the roofline reached instead (1 = the roofline). A series is every row with the same case, query length, storage,
//! ISA and thread count; only series with at least two key lengths are drawn. The dashed line
//! is the measured FMA peak (times the largest thread count), the dotted one the 256-bit peak
//! when AVX2 rows are drawn.

use crate::report::Row;
use std::collections::BTreeMap;
use std::fmt::Write as _;

const W: f64 = 1000.0;
const H: f64 = 540.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 330.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;
const COLORS: [&str; 10] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"];

pub fn svg(rows: &[Row], peak_gflops: f64, peak256_gflops: f64, title: &str) -> Option<String> {
    let decode = rows.iter().all(|r| r.seq_q <= 16);
    let metric = |r: &Row| if decode { 1.0 / r.x_roofline } else { r.gflops };
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for r in rows.iter().filter(|r| metric(r).is_finite() && metric(r) > 0.0) {
        let rows_per = if r.seq_q == r.seq_kv { "Sq=Skv".to_string() } else { format!("Sq={}", r.seq_q) };
        let name = format!("{} {rows_per} {} {} {}t", r.case, r.dtype, r.isa, r.threads);
        series.entry(name).or_default().push((r.seq_kv as f64, metric(r)));
    }
    series.retain(|_, pts| {
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        pts.dedup_by(|a, b| a.0 == b.0);
        pts.len() >= 2
    });
    if series.is_empty() {
        return None;
    }
    let max_threads = rows.iter().map(|r| r.threads).max().unwrap_or(1) as f64;
    let xs = series.values().flatten().map(|p| p.0);
    let (x_min, x_max) = xs.fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(x), hi.max(x)));
    let reference = if decode { 1.0 } else { peak_gflops * max_threads };
    let y_top = series.values().flatten().map(|p| p.1).fold(0.0, f64::max).max(if reference.is_finite() { reference } else { 0.0 });
    let y_max = nice_ceiling(y_top * 1.05);
    let (lx0, lx1) = (x_min.log2().floor(), x_max.log2().ceil().max(x_min.log2().floor() + 1.0));
    let px = |x: f64| LEFT + (x.log2() - lx0) / (lx1 - lx0) * (W - LEFT - RIGHT);
    let py = |y: f64| H - BOTTOM - y / y_max * (H - TOP - BOTTOM);

    let mut s = String::new();
    let _ = writeln!(s, r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#);
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>"#, (LEFT + W - RIGHT) / 2.0, escape(title));
    // Grid and ticks: powers of two along x, five steps along y.
    for e in (lx0 as i32)..=(lx1 as i32) {
        let x = px(2f64.powi(e));
        let _ = writeln!(s, r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{}" stroke="#e5e5e5"/>"##, H - BOTTOM);
        let _ = writeln!(s, r#"<text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"#, H - BOTTOM + 16.0, fmt_len(2f64.powi(e)));
    }
    for n in 0..=5 {
        let y = y_max * n as f64 / 5.0;
        let _ = writeln!(s, r##"<line x1="{LEFT}" y1="{:.1}" x2="{}" y2="{:.1}" stroke="#e5e5e5"/>"##, py(y), W - RIGHT, py(y));
        let label = if decode { format!("{y:.2}") } else { format!("{}", y.round()) };
        let _ = writeln!(s, r#"<text x="{}" y="{:.1}" text-anchor="end">{label}</text>"#, LEFT - 6.0, py(y) + 4.0);
    }
    let _ = writeln!(s, r#"<rect x="{LEFT}" y="{TOP}" width="{}" height="{}" fill="none" stroke="black"/>"#, W - LEFT - RIGHT, H - TOP - BOTTOM);
    let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle">key sequence length (Skv; Sq = Skv for prefill)</text>"#, (LEFT + W - RIGHT) / 2.0, H - 18.0);
    let y_label = if decode { "roofline / time (median; 1 = memory or FMA roofline)" } else { "GFLOP/s (median)" };
    let _ = writeln!(s, r#"<text transform="translate(18,{}) rotate(-90)" text-anchor="middle">{y_label}</text>"#, (TOP + H - BOTTOM) / 2.0);
    if decode {
        let _ = writeln!(s, r##"<line x1="{LEFT}" y1="{:.1}" x2="{}" y2="{:.1}" stroke="#555" stroke-dasharray="6,4"/>"##, py(1.0), W - RIGHT, py(1.0));
        let _ = writeln!(s, r##"<text x="{}" y="{:.1}" fill="#555">roofline</text>"##, LEFT + 6.0, py(1.0) - 5.0);
    } else if peak_gflops.is_finite() {
        let p = peak_gflops * max_threads;
        let _ = writeln!(s, r##"<line x1="{LEFT}" y1="{:.1}" x2="{}" y2="{:.1}" stroke="#555" stroke-dasharray="6,4"/>"##, py(p), W - RIGHT, py(p));
        let _ = writeln!(s, r##"<text x="{}" y="{:.1}" fill="#555">FMA peak x{max_threads} ({p:.0})</text>"##, LEFT + 6.0, py(p) - 5.0);
    }
    if !decode && peak256_gflops.is_finite() && rows.iter().any(|r| r.isa == "avx2") {
        let p = peak256_gflops * max_threads;
        let _ = writeln!(s, r##"<line x1="{LEFT}" y1="{:.1}" x2="{}" y2="{:.1}" stroke="#999" stroke-dasharray="2,4"/>"##, py(p), W - RIGHT, py(p));
        let _ = writeln!(s, r##"<text x="{}" y="{:.1}" fill="#777">256-bit FMA peak x{max_threads} ({p:.0})</text>"##, LEFT + 6.0, py(p) - 5.0);
    }
    for (n, (name, pts)) in series.iter().enumerate() {
        let color = COLORS[n % COLORS.len()];
        let path: Vec<String> = pts.iter().map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect();
        let _ = writeln!(s, r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#, path.join(" "));
        for &(x, y) in pts {
            let _ = writeln!(s, r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#, px(x), py(y));
        }
        let ly = TOP + 10.0 + 18.0 * n as f64;
        let _ = writeln!(s, r#"<line x1="{}" y1="{ly:.1}" x2="{}" y2="{ly:.1}" stroke="{color}" stroke-width="2"/>"#, W - RIGHT + 12.0, W - RIGHT + 36.0);
        let _ = writeln!(s, r#"<text x="{}" y="{:.1}">{}</text>"#, W - RIGHT + 42.0, ly + 4.0, escape(name));
    }
    s.push_str("</svg>\n");
    Some(s)
}

fn nice_ceiling(x: f64) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(x.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * p).find(|&v| v >= x).unwrap_or(10.0 * p)
}

fn fmt_len(x: f64) -> String {
    if x >= 1024.0 { format!("{}k", x / 1024.0) } else { format!("{x}") }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
