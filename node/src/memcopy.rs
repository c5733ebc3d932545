//! Memory copies at the CPU's pace on C libraries that get them wrong.
//!
//! glibc before 2.39 copies anything from a few KiB up with `rep movsb`
//! on CPUs that report fast short `rep movsb`. On AMD Zen 3 and later that
//! instruction runs at about 2 GB/s when the destination lies 1 to 31
//! bytes past the source modulo 4 KiB, against 40 GB/s and more otherwise
//! (glibc bug 30994). A link's bytes land in exactly that case several
//! times each: a frame body copied from the start of one large buffer to
//! just past a 12-byte yamux header or a 5-byte TLS record header in
//! another, both buffers page-aligned. On such a machine those copies cost
//! more than the link's encryption.
//!
//! glibc reads its tunables only when a process starts, so `mixnn`
//! measures that case first thing and, when it is much slower than a copy
//! between unrelated offsets, runs itself again (same process, same
//! arguments) with `rep movsb` kept for copies of a GiB and more, which is
//! what glibc does on CPUs without fast `rep movsb`. A `GLIBC_TUNABLES`
//! that already sets the threshold is left as it is, so
//! `GLIBC_TUNABLES=glibc.cpu.x86_rep_movsb_threshold=2048` keeps glibc's
//! own choice.

use std::time::{Duration, Instant};

/// The glibc tunable that decides from which size on `memcpy` uses
/// `rep movsb`.
pub const TUNABLE: &str = "glibc.cpu.x86_rep_movsb_threshold";
/// Its value here: `rep movsb` only from 1 GiB on.
pub const THRESHOLD: u64 = 1 << 30;
/// A copy just past its source this many times slower than one elsewhere
/// is the fault described above (measured: about 20 times; a healthy C
/// library is within 1.5 times).
pub const SLOW_FACTOR: f64 = 4.0;
/// Set in the environment of the second start: the slowdown measured by
/// the first, for reports.
pub const MEASURED_VAR: &str = "MIXNN_NEAR_COPY_SLOWDOWN";

/// The copy size probed: one yamux frame.
const PROBE_BYTES: usize = 16 * 1024;
const PROBE_ROUNDS: usize = 8;
const PROBE_COPIES: usize = 4;

/// What `GLIBC_TUNABLES` becomes, given its value now and the measured
/// slowdown of copies just past their source; `None` leaves the process
/// as it is.
pub fn tuned(current: Option<&str>, slowdown: f64) -> Option<String> {
    if slowdown.is_nan() || slowdown <= SLOW_FACTOR {
        return None;
    }
    let ours = format!("{TUNABLE}={THRESHOLD}");
    match current.map(str::trim).filter(|c| !c.is_empty()) {
        None => Some(ours),
        Some(c) if c.split(':').any(|t| t.split('=').next() == Some(TUNABLE)) => None,
        Some(c) => Some(format!("{c}:{ours}")),
    }
}

/// How many times slower `memcpy` copies [`PROBE_BYTES`] to a
/// destination 1 byte past its source modulo 4 KiB than to one 64 bytes
/// past it (the fastest of a few rounds each). Takes well under a
/// millisecond.
pub fn near_copy_slowdown() -> f64 {
    let src = vec![0x5au8; PROBE_BYTES];
    let mut dst = vec![0u8; PROBE_BYTES + 2 * PAGE];
    // The offset into `dst` that lies `distance` bytes past `src`,
    // modulo a page.
    let at = |dst: &[u8], distance: usize| {
        (src.as_ptr() as usize + distance).wrapping_sub(dst.as_ptr() as usize) % PAGE
    };
    let near = at(&dst, 1);
    let far = at(&dst, 64);
    let slow = fastest(&mut dst, near, &src);
    let fast = fastest(&mut dst, far, &src);
    slow.as_secs_f64() / fast.as_secs_f64().max(1e-9)
}

const PAGE: usize = 4096;

fn fastest(dst: &mut [u8], at: usize, src: &[u8]) -> Duration {
    let mut best = Duration::MAX;
    for _ in 0..PROBE_ROUNDS {
        let t = Instant::now();
        for i in 0..PROBE_COPIES {
            dst[at..at + src.len()].copy_from_slice(src);
            dst[at] = i as u8;
            std::hint::black_box(&mut *dst);
        }
        best = best.min(t.elapsed());
    }
    best
}

/// The slowdown the first start measured, when this process is the
/// second start.
pub fn measured() -> Option<f64> {
    std::env::var(MEASURED_VAR).ok()?.parse().ok()
}

/// One line for reports: what this process's copies run on.
pub fn describe() -> String {
    match measured() {
        Some(x) => format!(
            "memcpy just past its source was {x:.0}x slower than elsewhere, so glibc's `rep movsb` was kept only \
             for copies of 1 GiB and more ({TUNABLE})"
        ),
        None => "memcpy as the C library chose".into(),
    }
}

/// Call first in `main`, before any thread starts. Where the C library is
/// glibc and copies just past their source are slow, replaces this process with the
/// same program under the tuned `GLIBC_TUNABLES` and does not return;
/// otherwise, or if that fails, returns and the program runs as it is.
pub fn tune_or_continue() {
    #[cfg(all(target_os = "linux", target_env = "gnu", target_arch = "x86_64"))]
    {
        use std::os::unix::process::CommandExt;
        if measured().is_some() {
            // The second start: never a third.
            return;
        }
        let current = std::env::var("GLIBC_TUNABLES").ok();
        let slowdown = near_copy_slowdown();
        let Some(tunables) = tuned(current.as_deref(), slowdown) else {
            return;
        };
        let Ok(exe) = std::env::current_exe() else {
            return;
        };
        let mut args = std::env::args_os();
        let arg0 = args.next().unwrap_or_else(|| exe.clone().into_os_string());
        // Returns only on failure: the program then runs untuned.
        let _ = std::process::Command::new(exe)
            .arg0(arg0)
            .args(args)
            .env("GLIBC_TUNABLES", tunables)
            .env(MEASURED_VAR, format!("{slowdown:.1}"))
            .exec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_near_copies_get_the_threshold_and_keep_other_tunables() {
        let ours = format!("{TUNABLE}={THRESHOLD}");
        assert_eq!(tuned(None, 20.0), Some(ours.clone()));
        assert_eq!(tuned(Some(""), 20.0), Some(ours.clone()));
        assert_eq!(
            tuned(Some("glibc.malloc.arena_max=2"), 20.0),
            Some(format!("glibc.malloc.arena_max=2:{ours}"))
        );
    }

    #[test]
    fn healthy_copies_and_a_users_own_threshold_are_left_alone() {
        assert_eq!(tuned(None, 1.2), None);
        assert_eq!(tuned(None, SLOW_FACTOR), None);
        assert_eq!(tuned(None, f64::NAN), None);
        assert_eq!(tuned(Some(&format!("{TUNABLE}=2048")), 20.0), None);
        assert_eq!(
            tuned(
                Some(&format!("glibc.malloc.arena_max=2:{TUNABLE}=2048")),
                20.0
            ),
            None
        );
        // A longer name that merely starts like ours is another tunable.
        assert!(tuned(Some(&format!("{TUNABLE}_x=1")), 20.0).is_some());
    }

    #[test]
    fn the_probe_measures_a_finite_slowdown() {
        let x = near_copy_slowdown();
        assert!(x.is_finite() && x > 0.0, "{x}");
    }
}
