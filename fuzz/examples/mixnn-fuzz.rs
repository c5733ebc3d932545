//! The libFuzzer binary (an example of this crate, see Cargo.toml): one for
//! all targets, the target named by `MIXNN_FUZZ_TARGET` (`list` prints
//! them). `fuzz/run.sh` builds and runs it.

#![no_main]
#![allow(
    unsafe_code,
    reason = "libFuzzer's entry points are #[no_mangle] extern \"C\" functions"
)]

use std::sync::OnceLock;

use mixnn_fuzz::Target;

static TARGET: OnceLock<&'static Target> = OnceLock::new();

fn init() {
    let name = std::env::var("MIXNN_FUZZ_TARGET").unwrap_or_default();
    if name == "list" {
        for t in mixnn_fuzz::TARGETS {
            println!("{} {}", t.name, t.max_len);
        }
        std::process::exit(0);
    }
    let Some(target) = mixnn_fuzz::target(&name) else {
        let names: Vec<_> = mixnn_fuzz::TARGETS.iter().map(|t| t.name).collect();
        eprintln!(
            "set MIXNN_FUZZ_TARGET to one of: {} (or list)",
            names.join(", ")
        );
        std::process::exit(2);
    };
    // libFuzzer reads its corpus after this returns: seed it first.
    if let Ok(dir) = std::env::var("MIXNN_FUZZ_SEED_DIR") {
        if let Err(e) = mixnn_fuzz::write_seeds(target, std::path::Path::new(&dir)) {
            eprintln!("cannot write the seeds of {name} to {dir}: {e}");
            std::process::exit(2);
        }
    }
    let _ = TARGET.set(target);
}

libfuzzer_sys::fuzz_target!(init: init(), |data: &[u8]| {
    if let Some(t) = TARGET.get() {
        (t.run)(data);
    }
});
