//! ISA selection: the environment variable, the process-wide override and the per-call choice,
//! in one test because the environment and the override are process-wide.

use simd_attn::*;

fn run(config: &RunConfig) -> Result<RunInfo, AttnError> {
    let s = AttentionShape::new(1, 2, 1, 3, 40, 64);
    let [qs, ks, vs, os] = s.bhsd_strides();
    let [nq, nk, nv, no] = s.bhsd_lens();
    let (q, k, v) = (vec![0.1f32; nq], vec![0.2f32; nk], vec![0.3f32; nv]);
    let mut out = vec![0.0f32; no];
    attention_with(config, &s, TensorRef::new(&q, qs), TensorRef::new(&k, ks), TensorRef::new(&v, vs), TensorMut::new(&mut out, os), None, &AttentionParams::new())
}

#[test]
fn env_override_and_per_call_choice() {
    // Set before the first call: the variable is read once per process.
    let forced = if Isa::Avx2.is_available() { Isa::Avx2 } else { Isa::Scalar };
    std::env::set_var("SIMD_ATTN_ISA", forced.name());
    assert_eq!(run(&RunConfig::default()).unwrap().isa, forced);

    set_isa_override(Some(Isa::Scalar)).unwrap();
    assert_eq!(isa_override(), Some(Isa::Scalar));
    assert_eq!(run(&RunConfig::default()).unwrap().isa, Isa::Scalar);
    // The per-call choice wins over both.
    assert_eq!(run(&RunConfig { isa: Some(Isa::Portable), ..RunConfig::default() }).unwrap().isa, Isa::Portable);
    set_isa_override(None).unwrap();
    assert_eq!(run(&RunConfig::default()).unwrap().isa, forced);

    // Paths this machine lacks are refused with a clear error, not silently replaced.
    for isa in Isa::ALL.into_iter().filter(|i| !i.is_available()) {
        assert_eq!(set_isa_override(Some(isa)), Err(AttnError::IsaUnavailable { isa }));
        assert_eq!(run(&RunConfig { isa: Some(isa), ..RunConfig::default() }), Err(AttnError::IsaUnavailable { isa }));
    }
}

#[test]
fn names_round_trip() {
    for isa in Isa::ALL {
        assert_eq!(Isa::from_name(isa.name()), Some(isa));
        assert_eq!(Isa::from_name(&isa.name().to_uppercase()), Some(isa));
    }
    assert_eq!(Isa::from_name("sse9"), None);
    assert!(Isa::available().contains(&Isa::Portable) && Isa::available().contains(&Isa::Scalar));
    assert!(Isa::best().is_available());
}

/// Every AArch64 CPU has NEON (ARMv8.0 on) and gets the NEON path, whether or not it has the
/// later extensions (FCMA is ARMv8.3): Graviton2, Ampere Altra and Cortex-A72 included. CI runs
/// this under `qemu-aarch64 -cpu neoverse-n1` as well as `-cpu max`.
#[cfg(target_arch = "aarch64")]
#[test]
fn every_aarch64_cpu_gets_the_neon_path() {
    assert!(Isa::Neon.is_available());
    assert_eq!(Isa::best(), Isa::Neon);
    let info = run(&RunConfig { isa: Some(Isa::Neon), ..RunConfig::default() }).unwrap();
    assert_eq!((info.isa, info.specialised_head_dim), (Isa::Neon, Some(64)));
}

/// The best path is a SIMD one wherever the CPU has one.
#[test]
fn the_best_path_is_the_widest_simd_the_cpu_has() {
    let simd = [Isa::Avx512, Isa::Avx2, Isa::Neon].into_iter().find(|i| i.is_available());
    assert_eq!(Isa::best(), simd.unwrap_or(Isa::Scalar));
    if cfg!(target_arch = "aarch64") {
        assert_eq!(Isa::best(), Isa::Neon);
    }
}
