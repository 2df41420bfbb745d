//! What the T3 test binaries share.

/// Whether KVM is usable here; without it the test prints why and is skipped, unless
/// VMRUN_REQUIRE_KVM=1 (CI), where that is a failure.
pub fn kvm_or_skip(test: &str) -> bool {
    match vmrun::vstate::vm::open_kvm().and_then(|k| vmrun::vstate::vm::create_vm(&k)) {
        Ok(_) => true,
        Err(e) => {
            assert!(
                std::env::var_os("VMRUN_REQUIRE_KVM").is_none(),
                "{test}: KVM required but unusable: {e}"
            );
            eprintln!("SKIPPED {test}: no usable KVM here ({e})");
            false
        }
    }
}
