#![no_main]
//! The `manifest` target; its body lives in `logitcache_core::fuzz_targets`, shared with the
//! corpus replay test of the core crate.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    logitcache_core::fuzz_targets::manifest(data);
});
