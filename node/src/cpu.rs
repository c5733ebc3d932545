//! CPU clocks of this process's threads, read from Linux's `/proc` (the
//! scheduler's own nanosecond accounting). Elsewhere every reading is
//! `None` and the reports that use them say so.

use std::collections::BTreeMap;

pub use mixnn_model::cpu::thread_cpu_ns;
use mixnn_model::cpu::{ended_threads, schedstat};

/// The CPU clocks of this process's threads at one moment, by thread id,
/// with each thread's name: the live threads', and the final clocks of
/// those that left them as they ended ([`mixnn_model::cpu::record_end`]:
/// a slot worker's helper and update threads, which end with its job run).
#[derive(Clone, Debug, Default)]
pub struct ThreadClocks(BTreeMap<u32, (String, u64)>);

impl ThreadClocks {
    /// Reads every live thread's clock and the ended threads' last ones;
    /// `None` off Linux.
    pub fn read() -> Option<ThreadClocks> {
        let mut out = BTreeMap::new();
        for entry in std::fs::read_dir("/proc/self/task").ok()? {
            let Ok(entry) = entry else { continue };
            let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else {
                continue;
            };
            let dir = entry.path();
            // A thread may end between the listing and these reads.
            let Ok(name) = std::fs::read_to_string(dir.join("comm")) else {
                continue;
            };
            let Some(ns) = schedstat(&dir.join("schedstat")) else {
                continue;
            };
            out.insert(tid, (name.trim_end().to_string(), ns));
        }
        // The ended threads after the live ones: a thread leaves its clock
        // before it leaves `/proc`, so one that ends during the listing is
        // found either way (read the other way round, a pool that ended
        // in between was missed). A live thread's clock stands.
        for e in ended_threads() {
            out.entry(e.tid).or_insert((e.name, e.cpu_ns));
        }
        Some(ThreadClocks(out))
    }

    /// Nanoseconds of CPU each thread used since `before`, summed by
    /// thread name. A thread started since counts in full. A thread that
    /// ended since counts up to its last clock if it left one, and not at
    /// all otherwise, so that an earlier run's threads that end meanwhile
    /// take nothing away from this run's figures. A thread id the kernel
    /// gave to a new thread (another name, or a clock that went back)
    /// counts as new.
    pub fn used_since(&self, before: &ThreadClocks) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for (tid, (name, ns)) in &self.0 {
            let start = match before.0.get(tid) {
                Some((was, then)) if was == name && then <= ns => *then,
                _ => 0,
            };
            *out.entry(name.clone()).or_insert(0) += ns - start;
        }
        out
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn clocks(threads: &[(u32, &str, u64)]) -> ThreadClocks {
        ThreadClocks(
            threads
                .iter()
                .map(|&(tid, name, ns)| (tid, (name.to_string(), ns)))
                .collect(),
        )
    }

    #[test]
    fn each_thread_counts_what_it_used_since_and_ended_threads_take_nothing_away() {
        let before = clocks(&[
            (10, "party-0", 1_000),
            (11, "pool", 5_000),
            (12, "pool", 9_000_000), // an earlier run's helper, about to end
            (13, "party-1", 7_000),
        ]);
        let after = clocks(&[
            (10, "party-0", 1_600),
            (11, "pool", 5_900),
            (14, "pool", 300), // started since: counts in full
            (13, "mix", 40),   // tid reused under another name
        ]);
        let used = after.used_since(&before);
        assert_eq!(used.get("party-0"), Some(&600));
        assert_eq!(used.get("pool"), Some(&(900 + 300)));
        assert_eq!(used.get("mix"), Some(&40));
        assert_eq!(used.get("party-1"), None);
        // A reused tid whose clock went back counts as a new thread.
        let reused = clocks(&[(10, "party-0", 200)]);
        assert_eq!(reused.used_since(&before).get("party-0"), Some(&200));
    }

    /// Keeps the calling thread busy until its clock has moved `ms`
    /// (or, without a clock to read, for `ms` of wall time).
    fn spin(ms: u64) {
        let wall = std::time::Instant::now();
        let start = thread_cpu_ns();
        let mut x = 0u64;
        loop {
            for _ in 0..10_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
            let done = match (start, thread_cpu_ns()) {
                (Some(s), Some(now)) => now.saturating_sub(s) >= ms * 1_000_000,
                _ => wall.elapsed() >= std::time::Duration::from_millis(ms),
            };
            if done {
                return;
            }
        }
    }

    #[test]
    fn a_busy_thread_clock_moves_and_is_found_by_name() {
        let (Some(before), Some(clocks_before)) = (thread_cpu_ns(), ThreadClocks::read()) else {
            // Not Linux: nothing to read.
            assert!(ThreadClocks::read().is_none());
            return;
        };
        let t = std::thread::Builder::new()
            .name("cpu-test-spin".into())
            .spawn(move || {
                spin(60);
                let used = thread_cpu_ns().unwrap_or(0);
                let by_name = ThreadClocks::read()
                    .unwrap_or_default()
                    .used_since(&clocks_before);
                (used, by_name.get("cpu-test-spin").copied().unwrap_or(0))
            })
            .expect("spawn");
        let (used, by_name) = t.join().expect("join");
        assert!(used >= 60_000_000, "a 60 ms spin used {used} ns");
        assert!(by_name >= 60_000_000, "{by_name}");
        assert!(thread_cpu_ns().unwrap_or(0) >= before);
        assert!(process_cpu_ns().is_some());
    }

    /// Runs a thread named `name` that spins `first_ms`, waits while the
    /// clocks are read, then runs `then` (where there was a reading) and
    /// ends. Returns the reading, taken after the thread has ended.
    fn read_between(
        name: &str,
        first_ms: u64,
        then: impl FnOnce() + Send + 'static,
    ) -> Option<ThreadClocks> {
        let (go, wait) = std::sync::mpsc::sync_channel::<bool>(0);
        let (ready, busy) = std::sync::mpsc::sync_channel::<()>(0);
        let t = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                spin(first_ms);
                let _ = ready.send(());
                if wait.recv() == Ok(true) {
                    then();
                }
            })
            .expect("spawn");
        busy.recv().expect("the thread ran");
        let reading = ThreadClocks::read();
        go.send(reading.is_some()).expect("the thread waits");
        t.join().expect("join");
        reading
    }

    #[test]
    fn a_thread_that_ends_between_readings_does_not_hide_its_successor() {
        // An earlier run's thread, busy before the first reading, ends
        // before the second; a thread of the same name does this run's
        // work. Summing clocks by name would give nothing (the earlier
        // thread's clock leaves the sum); by thread, the successor's work.
        const NAME: &str = "cpu-test-turn";
        let Some(before) = read_between(NAME, 80, || {}) else {
            return;
        };
        let later = std::thread::Builder::new()
            .name(NAME.into())
            .spawn(move || {
                spin(30);
                ThreadClocks::read().unwrap_or_default().used_since(&before)
            })
            .expect("spawn");
        // The later thread's 30 ms, not the earlier one's 80.
        assert_counted(&later.join().expect("join"), NAME, 30, 80);
    }

    /// `used` holds at least `ms` and under `under_ms` for `name`.
    fn assert_counted(used: &BTreeMap<String, u64>, name: &str, ms: u64, under_ms: u64) {
        let ns = used.get(name).copied().unwrap_or(0);
        assert!(
            (ms * 1_000_000..under_ms * 1_000_000).contains(&ns),
            "{name}: {ns} ns counted, expected {ms} ms to under {under_ms} ms"
        );
    }

    #[test]
    fn a_thread_that_leaves_its_clock_as_it_ends_counts_up_to_its_end() {
        // A slot worker's helper: busy before the first reading, busy
        // again after it, then ended before the second.
        const NAME: &str = "cpu-test-helper";
        let Some(before) = read_between(NAME, 40, || {
            spin(30);
            mixnn_model::cpu::record_end();
        }) else {
            return;
        };
        let used = ThreadClocks::read().unwrap_or_default().used_since(&before);
        // Its 30 ms after the reading, not the 40 before it.
        assert_counted(&used, NAME, 30, 40);
    }
}
