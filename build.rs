//! Reads the declarative kernel families in `kernels/*.toml` and generates the tiling table
//! (block sizes per ISA x dtype x head dim) into `OUT_DIR/kernel_table.rs`.
//!
//! The block-size rule itself lives in `src/plan/tile_rule.rs` and is included here verbatim,
//! so the sizes baked for specialised head dims and those computed at run time for the generic
//! path come from the same code.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

#[allow(dead_code)]
mod tile_rule {
    include!("src/plan/tile_rule.rs");
}

#[derive(Debug)]
enum Value {
    Int(usize),
    Str(String),
    List(Vec<usize>),
}

struct Family {
    file: String,
    line: usize,
    keys: BTreeMap<String, Value>,
}

fn fail(msg: String) -> ! {
    // A panic in a build script prints the message as the build error.
    panic!("\n\nkernels/: {msg}\n");
}

fn parse_value(raw: &str, at: &str) -> Value {
    let raw = raw.trim();
    if let Some(s) = raw.strip_prefix('"') {
        let Some(s) = s.strip_suffix('"') else { fail(format!("{at}: unterminated string")) };
        return Value::Str(s.to_string());
    }
    if let Some(s) = raw.strip_prefix('[') {
        let Some(s) = s.strip_suffix(']') else { fail(format!("{at}: unterminated list")) };
        let items = s
            .split(',')
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .map(|x| x.parse().unwrap_or_else(|_| fail(format!("{at}: `{x}` is not an integer"))))
            .collect();
        return Value::List(items);
    }
    Value::Int(raw.parse().unwrap_or_else(|_| fail(format!("{at}: `{raw}` is not an integer, string or list"))))
}

/// The subset of TOML the kernel files use: `[[family]]` headers, `key = value` lines with
/// integers, strings and integer lists, and `#` comments.
fn parse(file: &str, text: &str) -> Vec<Family> {
    let mut out: Vec<Family> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let at = format!("{file}:{}", n + 1);
        let line = line.split('#').next().unwrap().trim();
        if line.is_empty() {
            continue;
        }
        if line == "[[family]]" {
            out.push(Family { file: file.to_string(), line: n + 1, keys: BTreeMap::new() });
            continue;
        }
        let Some((k, v)) = line.split_once('=') else { fail(format!("{at}: expected `key = value` or `[[family]]`")) };
        let Some(fam) = out.last_mut() else { fail(format!("{at}: `{}` before any [[family]]", k.trim())) };
        let key = k.trim().to_string();
        if fam.keys.insert(key.clone(), parse_value(v, &at)).is_some() {
            fail(format!("{at}: `{key}` given twice"));
        }
    }
    out
}

struct Resolved {
    isa: &'static str,
    dtype: &'static str,
    head_dims: Vec<usize>,
    additive_dims: Vec<usize>,
    mr: usize,
    nr_vectors: usize,
    lanes: usize,
    registers: usize,
    l1: usize,
    l2: usize,
}

fn resolve(f: &Family) -> Resolved {
    let at = format!("{}:{} [[family]]", f.file, f.line);
    const KNOWN: [&str; 10] =
        ["isa", "dtype", "head_dims", "additive_dims", "mr", "nr_vectors", "lanes", "registers", "l1_kib", "l2_kib"];
    if let Some(k) = f.keys.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        fail(format!("{at}: unknown key `{k}` (known: {})", KNOWN.join(", ")));
    }
    let int = |k: &str| match f.keys.get(k) {
        Some(Value::Int(x)) if *x > 0 => *x,
        Some(v) => fail(format!("{at}: `{k}` must be a positive integer, got {v:?}")),
        None => fail(format!("{at}: missing `{k}`")),
    };
    let string = |k: &str| match f.keys.get(k) {
        Some(Value::Str(s)) => s.clone(),
        Some(v) => fail(format!("{at}: `{k}` must be a string, got {v:?}")),
        None => fail(format!("{at}: missing `{k}`")),
    };
    let isa: &'static str = match string("isa").as_str() {
        "portable" => "Portable",
        "scalar" => "Scalar",
        "avx2" => "Avx2",
        "avx512" => "Avx512",
        "neon" => "Neon",
        "avx512bf16" => "Avx512Bf16",
        other => fail(format!("{at}: isa `{other}` is not one of portable, scalar, avx2, avx512, neon, avx512bf16")),
    };
    let dtype: &'static str = match string("dtype").as_str() {
        "f32" => "F32",
        "f16" => "F16",
        "bf16" => "Bf16",
        other => fail(format!("{at}: dtype `{other}` is not one of f32, f16, bf16")),
    };
    let head_dims = match f.keys.get("head_dims") {
        Some(Value::List(v)) => v.clone(),
        Some(v) => fail(format!("{at}: `head_dims` must be a list of integers, got {v:?}")),
        None => fail(format!("{at}: missing `head_dims` (use [] for none)")),
    };
    // Optional: attention dims of the additive score with a specialised kernel. The kernel pads
    // the attention dim to a multiple of 16 (every ISA's lanes divide it), so only such dims
    // can ever be dispatched.
    let additive_dims = match f.keys.get("additive_dims") {
        Some(Value::List(v)) => v.clone(),
        Some(v) => fail(format!("{at}: `additive_dims` must be a list of integers, got {v:?}")),
        None => Vec::new(),
    };
    if let Some(a) = additive_dims.iter().find(|&&a| a == 0 || a % 16 != 0) {
        fail(format!("{at}: additive dim {a} must be a positive multiple of 16 (the padded row pitch)"));
    }
    let r = Resolved {
        isa,
        dtype,
        head_dims,
        additive_dims,
        mr: int("mr"),
        nr_vectors: int("nr_vectors"),
        lanes: int("lanes"),
        registers: int("registers"),
        l1: int("l1_kib") * 1024,
        l2: int("l2_kib") * 1024,
    };
    let expect_lanes = match isa {
        "Avx512" | "Avx512Bf16" => Some(16),
        "Avx2" => Some(8),
        "Neon" => Some(4),
        "Scalar" => Some(1),
        _ => None,
    };
    if let Some(l) = expect_lanes {
        if r.lanes != l {
            fail(format!("{at}: {isa} has {l} f32 lanes per vector, not {}", r.lanes));
        }
    }
    let need = tile_rule::registers_needed(r.mr, r.nr_vectors);
    if need > r.registers {
        fail(format!(
            "{at}: a {}x{} register tile needs {need} vector registers ({} accumulators + {} loads + 1 broadcast) but {isa} has {}",
            r.mr, r.nr_vectors, r.mr * r.nr_vectors, r.nr_vectors, r.registers
        ));
    }
    let mut seen = r.head_dims.clone();
    seen.sort_unstable();
    if let Some(w) = seen.windows(2).find(|w| w[0] == w[1]) {
        fail(format!("{at}: head dim {} listed twice", w[0]));
    }
    if let Some(d) = r.head_dims.iter().find(|&&d| d == 0 || d % r.lanes != 0) {
        fail(format!("{at}: specialised head dim {d} must be a positive multiple of the {} lanes", r.lanes));
    }
    if !(r.nr_vectors * r.lanes).is_multiple_of(r.mr) {
        fail(format!(
            "{at}: a row tile of nr_vectors * lanes = {} rows must split into P.V tiles of mr = {} rows",
            r.nr_vectors * r.lanes,
            r.mr
        ));
    }
    if let Some(&d) = seen.last() {
        let panel = tile_rule::panel_bytes(d, r.nr_vectors * r.lanes);
        if 2 * panel > r.l1 {
            fail(format!(
                "{at}: head dim {d} streams a {panel}-byte Q^T row tile per key group; it must fit in half of l1_kib = {}",
                r.l1 / 1024
            ));
        }
    }
    r
}

fn list(xs: &[usize]) -> String {
    xs.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", ")
}

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=src/plan/tile_rule.rs");
    // The C ABI test (tests/capi.rs) compiles C for the same target with the `cc` crate, which
    // outside a build script needs to be told the target and host.
    for var in ["TARGET", "HOST"] {
        println!("cargo:rustc-env=SIMD_ATTN_BUILD_{var}={}", std::env::var(var).unwrap_or_default());
    }
    let mut files: Vec<_> = std::fs::read_dir("kernels")
        .unwrap_or_else(|e| fail(format!("cannot read the kernels/ directory: {e}")))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    let mut families = Vec::new();
    for path in &files {
        println!("cargo:rerun-if-changed={}", path.display());
        let text = std::fs::read_to_string(path).unwrap();
        for f in parse(&path.display().to_string(), &text) {
            families.push(resolve(&f));
        }
    }
    // The AVX512_BF16 path runs its other calls on the AVX-512 kernels with its own plans, and
    // its zero-skipping rerun on the AVX-512 f32 body: the register tiles must be the same.
    for f in families.iter().filter(|f| f.isa == "Avx512Bf16") {
        if f.dtype != "Bf16" {
            fail(format!("isa avx512bf16 has kernels for dtype bf16 only, not {}", f.dtype));
        }
        match families.iter().find(|g| g.isa == "Avx512" && g.dtype == "F32") {
            Some(g) if (g.mr, g.nr_vectors) == (f.mr, f.nr_vectors) => {}
            Some(g) => fail(format!("avx512bf16 must share avx512's register tile (mr {}, nr_vectors {}), not mr {}, nr_vectors {}", g.mr, g.nr_vectors, f.mr, f.nr_vectors)),
            None => fail("isa avx512bf16 needs the avx512 f32 family".into()),
        }
    }
    for (a, fa) in families.iter().enumerate() {
        if let Some(fb) = families[a + 1..].iter().find(|fb| fb.isa == fa.isa && fb.dtype == fa.dtype) {
            fail(format!("two families for isa {} dtype {}", fa.isa, fb.dtype));
        }
    }

    let mut src = String::from("// @generated by build.rs from kernels/*.toml. Do not edit.\n\n");
    src.push_str("pub const FAMILIES: &[Family] = &[\n");
    for f in &families {
        let dims: Vec<String> = f.head_dims.iter().map(|d| d.to_string()).collect();
        writeln!(
            src,
            "    Family {{ isa: Isa::{}, dtype: DType::{}, head_dims: &[{}], additive_dims: &[{}], mr: {}, nr_vectors: {}, lanes: {}, registers: {}, l1_bytes: {}, l2_bytes: {} }},",
            f.isa, f.dtype, dims.join(", "), list(&f.additive_dims), f.mr, f.nr_vectors, f.lanes, f.registers, f.l1, f.l2
        )
        .unwrap();
    }
    src.push_str("];\n\n/// One entry per specialised head dim of each family (square: `v_head_dim == head_dim`).\n");
    src.push_str("pub const SPECIALISATIONS: &[Specialisation] = &[\n");
    for f in &families {
        for &d in &f.head_dims {
            let nr = f.nr_vectors * f.lanes;
            let bc = tile_rule::key_block(d, d, f.l1, f.l2, nr, f.mr);
            let br = tile_rule::query_block(d, d, f.l2, nr);
            writeln!(
                src,
                "    Specialisation {{ isa: Isa::{}, dtype: DType::{}, head_dim: {d}, tiles: Tiles {{ br: {br}, bc: {bc}, mr: {}, nr: {nr} }} }},",
                f.isa, f.dtype, f.mr
            )
            .unwrap();
        }
    }
    src.push_str("];\n\n");
    // The dispatch table: every SIMD family with its register tile and specialised head dims.
    src.push_str("/// Calls `$m!` with one `[Isa, DType, MR, NRV, [head dims], [additive dims]]` entry per SIMD family.\n");
    src.push_str("macro_rules! for_each_simd_family {\n    ($m:ident) => {\n        $m! {\n");
    for f in families.iter().filter(|f| f.isa != "Portable") {
        let dims: Vec<String> = f.head_dims.iter().map(|d| d.to_string()).collect();
        writeln!(src, "            [{}, {}, {}, {}, [{}], [{}]]", f.isa, f.dtype, f.mr, f.nr_vectors, dims.join(", "), list(&f.additive_dims)).unwrap();
    }
    src.push_str("        }\n    };\n}\n");
    let out = Path::new(&std::env::var("OUT_DIR").unwrap()).join("kernel_table.rs");
    std::fs::write(out, src).unwrap();
}
