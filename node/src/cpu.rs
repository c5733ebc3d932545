//! CPU clocks of this process's threads, read from Linux's `/proc` (the
//! scheduler's own nanosecond accounting). Elsewhere every reading is
//! `None` and the reports that use them say so.

use std::collections::BTreeMap;

/// Nanoseconds of CPU the calling thread has used.
pub fn thread_cpu_ns() -> Option<u64> {
    schedstat(std::path::Path::new("/proc/thread-self/schedstat"))
}

/// Nanoseconds of CPU used by this process's live threads, summed by
/// thread name (threads that ended are not counted).
pub fn threads_cpu_ns() -> Option<BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir("/proc/self/task").ok()? {
        let Ok(entry) = entry else { continue };
        let dir = entry.path();
        let Ok(name) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        let Some(ns) = schedstat(&dir.join("schedstat")) else {
            continue;
        };
        *out.entry(name.trim_end().to_string()).or_insert(0) += ns;
    }
    Some(out)
}

/// Nanoseconds of CPU the whole process has used (threads that ended
/// included).
pub fn process_cpu_ns() -> Option<u64> {
    // utime and stime, fields 14 and 15, in clock ticks of 10 ms.
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after_name = stat.rsplit_once(')')?.1;
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) * 10_000_000)
}

fn schedstat(path: &std::path::Path) -> Option<u64> {
    let s = std::fs::read_to_string(path).ok()?;
    s.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_thread_clock_moves_and_is_found_by_name() {
        let Some(before) = thread_cpu_ns() else {
            // Not Linux: nothing to read.
            assert!(threads_cpu_ns().is_none());
            return;
        };
        let t = std::thread::Builder::new()
            .name("cpu-test-spin".into())
            .spawn(|| {
                let start = std::time::Instant::now();
                let mut x = 0u64;
                while start.elapsed() < std::time::Duration::from_millis(60) {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                }
                let used = thread_cpu_ns().unwrap_or(0);
                let by_name = threads_cpu_ns().unwrap_or_default();
                (used, by_name.get("cpu-test-spin").copied().unwrap_or(0))
            })
            .expect("spawn");
        let (used, by_name) = t.join().expect("join");
        assert!(used >= 20_000_000, "a 60 ms spin used {used} ns");
        assert!(by_name >= 20_000_000, "{by_name}");
        assert!(thread_cpu_ns().unwrap_or(0) >= before);
        assert!(process_cpu_ns().is_some());
    }
}
