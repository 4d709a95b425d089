//! The C ABI from C: compiles `tests/c/capi_test.c` against `include/simd_attn.h` with the
//! platform's C compiler, links it to the built `libsimd_attn.so` and, separately, to
//! `libsimd_attn.a`, and runs both. The C program checks the header against the library's own
//! layout and status table, forward against the library's f64 reference, host-driven plans
//! from pthreads, the merge, and every error path. The header is also compiled as C++.
//!
//! Valgrind (not run here; it cannot decode AVX-512, so pin AVX2):
//! `SIMD_ATTN_ISA=avx2 valgrind --error-exitcode=1 --leak-check=full target/release/capi-c/capi_test`

use std::path::{Path, PathBuf};
use std::process::Command;

/// `target/<profile>`: the test binary lives in its `deps/`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).unwrap().to_path_buf()
}

/// Where this build put `libsimd_attn.{so,a}`: `deps/`, beside the test binary (the same cargo
/// invocation built them; `cargo test` does not copy them up to `target/<profile>` the way
/// `cargo build` does).
fn lib_dir() -> PathBuf {
    let deps = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
    if deps.join("libsimd_attn.so").exists() { deps } else { profile_dir() }
}

fn compiler(cpp: bool) -> Command {
    cc::Build::new()
        .cargo_metadata(false)
        .cargo_warnings(false)
        .cpp(cpp)
        .target(env!("SIMD_ATTN_BUILD_TARGET"))
        .host(env!("SIMD_ATTN_BUILD_HOST"))
        .opt_level(1)
        .debug(true)
        .get_compiler()
        .to_command()
}

fn run(mut cmd: Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: cannot start {cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed ({}):\n{text}", out.status);
    text
}

fn build_c_test(dir: &Path, lib_dir: &Path, static_link: bool) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exe = dir.join(if static_link { "capi_test_static" } else { "capi_test" });
    let mut cmd = compiler(false);
    cmd.args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-D_POSIX_C_SOURCE=200809L"])
        .arg(format!("-DSIMD_ATTN_EXPECTED_VERSION=\"{}\"", env!("CARGO_PKG_VERSION")))
        .arg("-I")
        .arg(root.join("include"))
        .arg(root.join("tests/c/capi_test.c"))
        .arg("-o")
        .arg(&exe);
    if static_link {
        cmd.arg(lib_dir.join("libsimd_attn.a")).args(["-lpthread", "-ldl", "-lm"]);
    } else {
        cmd.arg("-L").arg(lib_dir).arg("-lsimd_attn").arg(format!("-Wl,-rpath,{}", lib_dir.display())).args(["-lpthread", "-lm"]);
    }
    run(cmd, "compiling tests/c/capi_test.c");
    exe
}

#[test]
#[cfg(target_os = "linux")]
fn c_program_passes_against_the_header_and_both_libraries() {
    let lib_dir = lib_dir();
    for lib in ["libsimd_attn.so", "libsimd_attn.a"] {
        assert!(lib_dir.join(lib).exists(), "{lib} was not built in {}", lib_dir.display());
    }
    let dir = profile_dir().join("capi-c");
    std::fs::create_dir_all(&dir).unwrap();
    for static_link in [false, true] {
        let exe = build_c_test(&dir, &lib_dir, static_link);
        let mut cmd = Command::new(&exe);
        cmd.env_remove("SIMD_ATTN_ISA");
        let out = run(cmd, &exe.display().to_string());
        println!("{}: {out}", exe.display());
        assert!(out.contains(" 0 failures"), "{out}");
    }
}

/// `tests/c/oom_test.c`: every entry under a lowered address-space limit returns
/// OUT_OF_MEMORY with its outputs untouched (a process of its own: the limit is process-wide).
#[test]
#[cfg(target_os = "linux")]
fn entries_under_memory_pressure_return_out_of_memory_and_touch_nothing() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib_dir = lib_dir();
    let dir = profile_dir().join("capi-c");
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("oom_test");
    let mut cmd = compiler(false);
    cmd.args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-D_DEFAULT_SOURCE"])
        .arg("-I")
        .arg(root.join("include"))
        .arg(root.join("tests/c/oom_test.c"))
        .arg("-o")
        .arg(&exe)
        .arg("-L")
        .arg(&lib_dir)
        .arg("-lsimd_attn")
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        .args(["-lpthread", "-lm"]);
    run(cmd, "compiling tests/c/oom_test.c");
    let mut cmd = Command::new(&exe);
    cmd.env_remove("SIMD_ATTN_ISA");
    // Exit 77 (the automake convention): the address-space limit could not be set or is not
    // enforced. Accepted only where the runner says it emulates the CPU (qemu-user ignores a
    // guest's RLIMIT_AS); anywhere else the memory-pressure checks must run.
    let status = cmd.output().unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display()));
    let out = format!("{}{}", String::from_utf8_lossy(&status.stdout), String::from_utf8_lossy(&status.stderr));
    if status.status.code() == Some(77) && std::env::var_os("SIMD_ATTN_EMULATED").is_some() {
        println!("SKIPPED under emulation: {out}");
        return;
    }
    assert!(status.status.success(), "oom_test failed ({}):\n{out}", status.status);
    println!("{out}");
    assert!(out.contains(" 0 failures"), "{out}");
}

#[test]
#[cfg(target_os = "linux")]
fn header_compiles_as_cpp() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = profile_dir().join("capi-c");
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("header_check.cpp");
    std::fs::write(
        &src,
        "#include \"simd_attn.h\"\n#include <cstdio>\nint main() {\n  simd_attn_desc d;\n  simd_attn_desc_init(&d);\n  std::printf(\"%s\\n\", simd_attn_version());\n  return d.abi_version == SIMD_ATTN_ABI_VERSION ? 0 : 1;\n}\n",
    )
    .unwrap();
    let mut cmd = compiler(true);
    cmd.args(["-std=c++11", "-Wall", "-Wextra", "-Werror", "-c", "-I"]).arg(root.join("include")).arg(&src).arg("-o").arg(dir.join("header_check.o"));
    run(cmd, "compiling the header as C++");
}

/// The README's C example, compiled the way the README says (pkg-config on an installed
/// prefix, or the plain `-I include -L target/... -lsimd_attn` line), must run successfully.
#[test]
#[cfg(target_os = "linux")]
fn readme_c_example_compiles_and_runs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let start = readme.find("<!-- c-example -->\n```c\n").expect("README has the C example") + "<!-- c-example -->\n```c\n".len();
    let code = &readme[start..start + readme[start..].find("```").unwrap()];
    let lib_dir = lib_dir();
    let dir = profile_dir().join("capi-c");
    // An installed prefix, as .ci/install-c-lib lays it out.
    let prefix = dir.join("prefix");
    for sub in ["lib/pkgconfig", "include"] {
        std::fs::create_dir_all(prefix.join(sub)).unwrap();
    }
    for lib in ["libsimd_attn.so", "libsimd_attn.a"] {
        std::fs::copy(lib_dir.join(lib), prefix.join("lib").join(lib)).unwrap();
    }
    std::fs::copy(root.join("include/simd_attn.h"), prefix.join("include/simd_attn.h")).unwrap();
    let pc = std::fs::read_to_string(root.join("include/simd_attn.pc.in")).unwrap();
    let pc = pc.replace("@PREFIX@", &prefix.display().to_string()).replace("@VERSION@", env!("CARGO_PKG_VERSION"));
    std::fs::write(prefix.join("lib/pkgconfig/simd_attn.pc"), &pc).unwrap();
    let src = dir.join("hello.c");
    std::fs::write(&src, code).unwrap();
    let exe = dir.join("hello");

    let pkg = Command::new("pkg-config")
        .args(["--cflags", "--libs", "simd_attn"])
        .env("PKG_CONFIG_PATH", prefix.join("lib/pkgconfig"))
        .output();
    let flags: Vec<String> = match pkg {
        Ok(o) if o.status.success() => String::from_utf8(o.stdout).unwrap().split_whitespace().map(String::from).collect(),
        // No pkg-config on this machine: the README's second line.
        _ => vec![format!("-I{}", prefix.join("include").display()), format!("-L{}", prefix.join("lib").display()), "-lsimd_attn".into()],
    };
    let mut cmd = compiler(false);
    cmd.arg(&src).args(&flags).arg("-lm").arg(format!("-Wl,-rpath,{}", prefix.join("lib").display())).arg("-o").arg(&exe);
    run(cmd, "compiling the README's C example");
    let out = run(Command::new(&exe), "the README's C example");
    assert!(out.contains("out[0] = 0.5000"), "{out}");
}
