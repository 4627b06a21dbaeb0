//! Any bytes as a config file: a config or an error, never a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Loading reads the PEM files the config names. A device file
    // (/dev/zero, /dev/stdin) would read forever: the operator's own
    // choice of file, not a parser bug, so inputs naming one are skipped.
    // (A path spelled with TOML escapes gets through; the fuzzer is
    // unlikely to build one, and the run would stop on it as out of memory
    // or a timeout, to be read as this harness's limit.)
    if ["/dev", "/proc", "/sys"]
        .iter()
        .any(|dir| text.contains(dir))
    {
        return;
    }
    if let Ok(config) = tollgate::config::load_str(text, "fuzz") {
        // A loaded policy is usable: every rule's window maps to a unit.
        for rule in config.policy.rules() {
            let _ = tollgate::service::envoy::unit_for(rule.window());
        }
    }
});
