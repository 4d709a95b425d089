//! Results as rows: the printed table, the machine-readable files (`--json`, `--csv`) and the
//! `compare` mode that reads two of them back.
//!
//! The JSON is written one result object per line (inside a `"results"` array), so `compare`
//! reads it with a small flat-object parser instead of pulling a JSON crate into the library's
//! dependency tree; CSV files compare the same way.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The machine and build a run measured on.
#[derive(Clone, Debug)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub isa_best: String,
    pub peak_gflops: f64,
    pub peak256_gflops: f64,
    pub bandwidth_gbs: f64,
    pub llc_bytes: usize,
    pub version: String,
    pub commit: String,
    pub date_unix: u64,
}

/// One measured (shape, storage, path, threads) combination.
#[derive(Clone, Debug, Default)]
pub struct Row {
    pub case: String,
    pub batch: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub seq_q: usize,
    pub seq_kv: usize,
    pub head_dim: usize,
    pub causal: bool,
    pub dtype: String,
    pub isa: String,
    pub threads: usize,
    pub ms: f64,
    pub best_ms: f64,
    pub spread: f64,
    pub gflops: f64,
    pub gflops_best: f64,
    pub pct_peak: f64,
    pub gbs: f64,
    /// The read bandwidth measured with this row's thread count, which `pct_bw` and
    /// `x_roofline` are of.
    pub bw_gbs: f64,
    pub pct_bw: f64,
    pub x_roofline: f64,
    pub x_portable: f64,
    pub x_unfused: f64,
    pub max_err: f64,
    /// The additive score's throughput in 1e9 (visible pair x attention dim) per second; NaN
    /// for the other scores.
    pub gpair_dims: f64,
}

pub fn table_header() -> String {
    format!(
        "{:<12} {:>2} {:>3} {:>3} {:>5} {:>5} {:>4} {:>6} {:<5} {:<8} {:>3} {:>9} {:>6} {:>8} {:>8} {:>6} {:>6} {:>5} {:>5} {:>7} {:>9} {:>9} {:>8} {:>7}",
        "case", "B", "Hq", "Hkv", "Sq", "Skv", "D", "causal", "dtype", "isa", "thr", "ms", "spread", "GFLOP/s", "best", "%peak", "GB/s", "BW", "%bw", "x roof", "x portable", "x unfused", "max err", "Gpd/s"
    )
}

pub fn table_row(r: &Row) -> String {
    // Columns a run did not measure (`--no-baselines`, `--no-check`, the score-only Gpd/s) are
    // NaN in the row and print as a dash.
    let or_dash = |x: f64, text: String| if x.is_nan() { "-".to_string() } else { text };
    format!(
        "{:<12} {:>2} {:>3} {:>3} {:>5} {:>5} {:>4} {:>6} {:<5} {:<8} {:>3} {:>9.3} {:>5.0}% {:>8.1} {:>8.1} {:>5.1}% {:>6.1} {:>5.1} {:>4.0}% {:>7} {:>10} {:>9} {:>8} {:>7}",
        r.case, r.batch, r.q_heads, r.kv_heads, r.seq_q, r.seq_kv, r.head_dim, r.causal, r.dtype, r.isa, r.threads, r.ms,
        r.spread * 100.0, r.gflops, r.gflops_best, r.pct_peak, r.gbs, r.bw_gbs, r.pct_bw,
        or_dash(r.x_roofline, format!("{:.2}x", r.x_roofline)),
        or_dash(r.x_portable, format!("{:.2}x", r.x_portable)),
        or_dash(r.x_unfused, format!("{:.2}x", r.x_unfused)),
        or_dash(r.max_err, format!("{:.1e}", r.max_err)),
        or_dash(r.gpair_dims, format!("{:.2}", r.gpair_dims)),
    )
}

/// Field names and values of a row, in file order. Numbers that were not measured are NaN
/// (written as `null` in JSON, empty in CSV).
fn fields(r: &Row) -> Vec<(&'static str, Value)> {
    use Value::{Num, Str};
    vec![
        ("case", Str(r.case.clone())),
        ("batch", Num(r.batch as f64)),
        ("q_heads", Num(r.q_heads as f64)),
        ("kv_heads", Num(r.kv_heads as f64)),
        ("seq_q", Num(r.seq_q as f64)),
        ("seq_kv", Num(r.seq_kv as f64)),
        ("head_dim", Num(r.head_dim as f64)),
        ("causal", Str(r.causal.to_string())),
        ("dtype", Str(r.dtype.clone())),
        ("isa", Str(r.isa.clone())),
        ("threads", Num(r.threads as f64)),
        ("ms", Num(r.ms)),
        ("best_ms", Num(r.best_ms)),
        ("spread", Num(r.spread)),
        ("gflops", Num(r.gflops)),
        ("gflops_best", Num(r.gflops_best)),
        ("pct_peak", Num(r.pct_peak)),
        ("gbs", Num(r.gbs)),
        ("bw_gbs", Num(r.bw_gbs)),
        ("pct_bw", Num(r.pct_bw)),
        ("x_roofline", Num(r.x_roofline)),
        ("x_portable", Num(r.x_portable)),
        ("x_unfused", Num(r.x_unfused)),
        ("max_err", Num(r.max_err)),
        ("gpair_dims", Num(r.gpair_dims)),
    ]
}

#[derive(Clone, Debug)]
enum Value {
    Num(f64),
    Str(String),
}

fn json_value(v: &Value) -> String {
    match v {
        Value::Num(x) if x.is_finite() => format!("{x}"),
        Value::Num(_) => "null".into(),
        Value::Str(s) => format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")),
    }
}

fn machine_fields(m: &Machine) -> Vec<(&'static str, Value)> {
    use Value::{Num, Str};
    vec![
        ("cpu", Str(m.cpu.clone())),
        ("cores", Num(m.cores as f64)),
        ("isa_best", Str(m.isa_best.clone())),
        ("fma_peak_gflops_per_core", Num(m.peak_gflops)),
        ("fma_peak_256bit_gflops_per_core", Num(m.peak256_gflops)),
        ("read_bandwidth_gbs", Num(m.bandwidth_gbs)),
        ("llc_bytes", Num(m.llc_bytes as f64)),
        ("crate_version", Str(m.version.clone())),
        ("git_commit", Str(m.commit.clone())),
        ("unix_time", Num(m.date_unix as f64)),
    ]
}

pub fn to_json(m: &Machine, rows: &[Row]) -> String {
    let obj = |f: Vec<(&str, Value)>| {
        let parts: Vec<String> = f.iter().map(|(k, v)| format!("\"{k}\": {}", json_value(v))).collect();
        format!("{{{}}}", parts.join(", "))
    };
    let mut s = String::new();
    let _ = writeln!(s, "{{\n  \"machine\": {},\n  \"results\": [", obj(machine_fields(m)));
    for (n, r) in rows.iter().enumerate() {
        let _ = writeln!(s, "    {}{}", obj(fields(r)), if n + 1 < rows.len() { "," } else { "" });
    }
    s.push_str("  ]\n}\n");
    s
}

/// CSV: `#`-prefixed machine lines, then a header and one line per row.
pub fn to_csv(m: &Machine, rows: &[Row]) -> String {
    let mut s = String::new();
    for (k, v) in machine_fields(m) {
        let v = match v {
            Value::Num(x) => format!("{x}"),
            Value::Str(t) => t.replace(',', ";"),
        };
        let _ = writeln!(s, "# {k}: {v}");
    }
    let names: Vec<&str> = fields(&Row::default()).iter().map(|(k, _)| *k).collect();
    let _ = writeln!(s, "{}", names.join(","));
    for r in rows {
        let vals: Vec<String> = fields(r)
            .into_iter()
            .map(|(_, v)| match v {
                Value::Num(x) if x.is_finite() => format!("{x}"),
                Value::Num(_) => String::new(),
                Value::Str(t) => t.replace(',', ";"),
            })
            .collect();
        let _ = writeln!(s, "{}", vals.join(","));
    }
    s
}

/// Parses one flat JSON object (`{"k": "v", "n": 1.5, "x": null}`) into strings.
fn parse_flat_object(line: &str) -> Option<BTreeMap<String, String>> {
    let body = line.trim().trim_end_matches(',').trim();
    let body = body.strip_prefix('{')?.strip_suffix('}')?;
    let mut map = BTreeMap::new();
    let mut chars = body.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        if chars.peek().is_none() {
            return Some(map);
        }
        let key = read_string(&mut chars)?;
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ':') {
            chars.next();
        }
        let value = if chars.peek() == Some(&'"') {
            read_string(&mut chars)?
        } else {
            let mut v = String::new();
            while chars.peek().is_some_and(|c| *c != ',') {
                v.push(chars.next()?);
            }
            v.trim().to_string()
        };
        map.insert(key, value);
    }
}

fn read_string(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> Option<String> {
    if chars.next()? != '"' {
        return None;
    }
    let mut s = String::new();
    loop {
        match chars.next()? {
            '\\' => s.push(chars.next()?),
            '"' => return Some(s),
            c => s.push(c),
        }
    }
}

/// A results file (JSON or CSV, as this tool writes them): the machine lines and the rows as
/// string maps.
pub struct Loaded {
    pub machine: BTreeMap<String, String>,
    pub rows: Vec<BTreeMap<String, String>>,
}

pub fn load(path: &str) -> Result<Loaded, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let mut machine = BTreeMap::new();
    let mut rows = Vec::new();
    if text.trim_start().starts_with('{') {
        for line in text.lines() {
            let t = line.trim();
            if let Some(rest) = t.strip_prefix("\"machine\":") {
                machine = parse_flat_object(rest).ok_or(format!("{path}: bad machine object"))?;
            } else if t.starts_with('{') && t.len() > 1 {
                rows.push(parse_flat_object(t).ok_or(format!("{path}: bad result line {t}"))?);
            }
        }
    } else {
        let mut header: Option<Vec<String>> = None;
        for line in text.lines() {
            if let Some(m) = line.strip_prefix("# ") {
                if let Some((k, v)) = m.split_once(": ") {
                    machine.insert(k.to_string(), v.to_string());
                }
            } else if let Some(h) = &header {
                rows.push(h.iter().cloned().zip(line.split(',').map(String::from)).collect());
            } else {
                header = Some(line.split(',').map(String::from).collect());
            }
        }
    }
    if rows.is_empty() {
        return Err(format!("{path}: no results"));
    }
    Ok(Loaded { machine, rows })
}

impl Loaded {
    fn num(m: &BTreeMap<String, String>, k: &str) -> f64 {
        m.get(k).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN)
    }

    /// A machine field as a number (NaN when absent).
    pub fn machine_num(&self, k: &str) -> f64 {
        Self::num(&self.machine, k)
    }

    /// The rows back as [`Row`]s (for re-plotting stored results).
    pub fn to_rows(&self) -> Vec<Row> {
        self.rows
            .iter()
            .map(|m| {
                let n = |k: &str| Self::num(m, k);
                let s = |k: &str| m.get(k).cloned().unwrap_or_default();
                Row {
                    case: s("case"),
                    batch: n("batch") as usize,
                    q_heads: n("q_heads") as usize,
                    kv_heads: n("kv_heads") as usize,
                    seq_q: n("seq_q") as usize,
                    seq_kv: n("seq_kv") as usize,
                    head_dim: n("head_dim") as usize,
                    causal: s("causal") == "true",
                    dtype: s("dtype"),
                    isa: s("isa"),
                    threads: n("threads") as usize,
                    ms: n("ms"),
                    best_ms: n("best_ms"),
                    spread: n("spread"),
                    gflops: n("gflops"),
                    gflops_best: n("gflops_best"),
                    pct_peak: n("pct_peak"),
                    gbs: n("gbs"),
                    bw_gbs: n("bw_gbs"),
                    pct_bw: n("pct_bw"),
                    x_roofline: n("x_roofline"),
                    x_portable: n("x_portable"),
                    x_unfused: n("x_unfused"),
                    max_err: n("max_err"),
                    gpair_dims: n("gpair_dims"),
                }
            })
            .collect()
    }
}

fn row_key(r: &BTreeMap<String, String>) -> String {
    let g = |k: &str| r.get(k).cloned().unwrap_or_default();
    format!(
        "{} B{} Hq{} Hkv{} Sq{} Skv{} D{}{} {} {} t{}",
        g("case"),
        g("batch"),
        g("q_heads"),
        g("kv_heads"),
        g("seq_q"),
        g("seq_kv"),
        g("head_dim"),
        if g("causal") == "true" { " causal" } else { "" },
        g("dtype"),
        g("isa"),
        g("threads")
    )
}

/// Row-by-row ratios new / old of the rows both files have: GFLOP/s (median and best), the
/// fraction of each run's own peak (which cancels machine drift), and time / roofline.
pub fn compare(old: &Loaded, new: &Loaded) -> String {
    let num = |r: &BTreeMap<String, String>, k: &str| r.get(k).and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN);
    let mut s = String::new();
    for (label, l) in [("old", old), ("new", new)] {
        let g = |k: &str| l.machine.get(k).cloned().unwrap_or_else(|| "?".into());
        let _ = writeln!(
            s,
            "# {label}: {} commit {} | {} | peak {} GFLOP/s/core, bandwidth {} GB/s",
            g("crate_version"),
            g("git_commit"),
            g("cpu"),
            g("fma_peak_gflops_per_core"),
            g("read_bandwidth_gbs")
        );
    }
    let _ = writeln!(s, "{:<60} {:>9} {:>9} {:>7} {:>7} {:>7} {:>8}", "row", "old GF/s", "new GF/s", "ratio", "best", "%peak", "roof");
    let old_rows: BTreeMap<String, &BTreeMap<String, String>> = old.rows.iter().map(|r| (row_key(r), r)).collect();
    let mut matched = 0;
    for r in &new.rows {
        let key = row_key(r);
        let Some(o) = old_rows.get(&key) else { continue };
        matched += 1;
        let ratio = |k: &str| num(r, k) / num(o, k);
        // time / roofline: lower is better, so old / new reads as a speedup like the others.
        let roof = num(o, "x_roofline") / num(r, "x_roofline");
        let _ = writeln!(
            s,
            "{:<60} {:>9.1} {:>9.1} {:>6.2}x {:>6.2}x {:>6.2}x {:>7.2}x",
            key,
            num(o, "gflops"),
            num(r, "gflops"),
            ratio("gflops"),
            ratio("gflops_best"),
            ratio("pct_peak"),
            roof
        );
    }
    let _ = writeln!(s, "# {matched} rows in both files (ratios are new / old; > 1 is faster)");
    // Peer rows (`benches/peers.py`: an `isa` that names no path of ours, such as
    // `onnxruntime-GroupQueryAttention`) pair with each row of the other file on the same shape,
    // dtype and thread count, whichever path ran it: the ratio is that row against the peer.
    let is_peer = |r: &BTreeMap<String, String>| r.get("isa").is_some_and(|i| simd_attn::Isa::from_name(i).is_none());
    let mut peers = 0;
    for r in new.rows.iter().filter(|r| !is_peer(r)) {
        for o in old.rows.iter().filter(|o| is_peer(o) && shape_key(o) == shape_key(r)) {
            peers += 1;
            let ratio = |k: &str| num(r, k) / num(o, k);
            let label = format!("{} vs {}", row_key(r), o.get("isa").map_or("?", String::as_str));
            let _ = writeln!(s, "{:<60} {:>9.1} {:>9.1} {:>6.2}x {:>6.2}x", label, num(o, "gflops"), num(r, "gflops"), ratio("gflops"), ratio("gflops_best"));
        }
    }
    if peers > 0 {
        let _ = writeln!(s, "# {peers} rows against a peer of the old file (> 1: the new file's row is faster)");
    }
    s
}

/// [`row_key`] without the path: what a peer row and a row of ours share.
fn shape_key(r: &BTreeMap<String, String>) -> String {
    let mut r = r.clone();
    r.remove("isa");
    row_key(&r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Machine, Vec<Row>) {
        let m = Machine {
            cpu: "Test CPU, \"quoted\"".into(),
            cores: 2,
            isa_best: "avx512".into(),
            peak_gflops: 190.5,
            peak256_gflops: f64::NAN,
            bandwidth_gbs: 14.0,
            llc_bytes: 1 << 20,
            version: "0.1.0".into(),
            commit: "abc".into(),
            date_unix: 1,
        };
        let r = Row { case: "prefill".into(), batch: 1, q_heads: 8, kv_heads: 2, seq_q: 64, seq_kv: 64, head_dim: 128, causal: true, dtype: "f32".into(), isa: "avx512".into(), threads: 1, ms: 2.0, gflops: 100.0, gflops_best: 110.0, pct_peak: 50.0, x_roofline: 2.0, x_portable: f64::NAN, ..Row::default() };
        let mut faster = r.clone();
        faster.gflops = 150.0;
        faster.x_roofline = 1.0;
        (m, vec![r, faster])
    }

    #[test]
    fn json_and_csv_round_trip_through_compare() {
        let (m, rows) = sample();
        let dir = std::env::temp_dir();
        for (ext, text) in [("json", to_json(&m, &rows[..1])), ("csv", to_csv(&m, &rows[..1]))] {
            let (a, b) = (dir.join(format!("sab_old.{ext}")), dir.join(format!("sab_new.{ext}")));
            std::fs::write(&a, &text).unwrap();
            let new_text = if ext == "json" { to_json(&m, &rows[1..]) } else { to_csv(&m, &rows[1..]) };
            std::fs::write(&b, new_text).unwrap();
            let (old, new) = (load(a.to_str().unwrap()).unwrap(), load(b.to_str().unwrap()).unwrap());
            assert_eq!(old.rows.len(), 1);
            assert_eq!(old.machine.get("crate_version").map(String::as_str), Some("0.1.0"));
            let out = compare(&old, &new);
            assert!(out.contains("1.50x"), "{ext}: {out}");
            assert!(out.contains("2.00x"), "{ext}: {out}");
            assert!(out.contains("1 rows in both"), "{ext}: {out}");
        }
    }

    /// A peer row (benches/peers.py) pairs with ours on the same shape, dtype and threads.
    #[test]
    fn compare_pairs_peer_rows_with_ours() {
        let (m, rows) = sample();
        let mut peer = rows[0].clone();
        peer.isa = "onnxruntime-GroupQueryAttention".into();
        peer.gflops = 50.0;
        let mut other_threads = peer.clone();
        other_threads.threads = 2;
        let dir = std::env::temp_dir();
        let (a, b) = (dir.join("sab_peer_old.json"), dir.join("sab_peer_new.json"));
        std::fs::write(&a, to_json(&m, &[peer, other_threads])).unwrap();
        std::fs::write(&b, to_json(&m, &rows[..1])).unwrap();
        let out = compare(&load(a.to_str().unwrap()).unwrap(), &load(b.to_str().unwrap()).unwrap());
        assert!(out.contains("vs onnxruntime-GroupQueryAttention"), "{out}");
        assert!(out.contains("2.00x"), "{out}");
        assert!(out.contains("# 1 rows against a peer"), "{out}");
    }
}
