//! Threads' CPU clocks, read from Linux's `/proc` (the scheduler's own
//! nanosecond accounting), and the last clocks of threads that ended.
//!
//! A slot worker's helper and update threads end with its job run, and
//! their clocks leave `/proc` with them. A report that accounts a
//! process's CPU thread by thread (`mixnn bench paper`'s CPU per party)
//! would then lose their work, so these threads leave their final clock
//! here as they end ([`record_end`]).

use std::collections::VecDeque;
use std::sync::Mutex;

/// Nanoseconds of CPU the calling thread has used; `None` off Linux.
pub fn thread_cpu_ns() -> Option<u64> {
    schedstat(std::path::Path::new("/proc/thread-self/schedstat"))
}

/// The first field of a `schedstat` file: nanoseconds on a CPU.
pub fn schedstat(path: &std::path::Path) -> Option<u64> {
    let s = std::fs::read_to_string(path).ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// A thread's clock as it ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndedThread {
    /// Its kernel thread id.
    pub tid: u32,
    pub name: String,
    /// Nanoseconds of CPU it used in all.
    pub cpu_ns: u64,
}

/// How many ended threads are remembered; older ones are forgotten. A
/// job run ends two to four threads per slot worker.
pub const ENDED_KEPT: usize = 1024;

static ENDED: Mutex<VecDeque<EndedThread>> = Mutex::new(VecDeque::new());

/// Called on a thread as it ends: remembers its clock (nothing off Linux).
pub fn record_end() {
    let Some(cpu_ns) = thread_cpu_ns() else {
        return;
    };
    let tid = rustix::thread::gettid().as_raw_nonzero().get() as u32;
    let name = std::thread::current().name().unwrap_or("").to_string();
    let mut ended = ENDED.lock().unwrap_or_else(|e| e.into_inner());
    if ended.len() == ENDED_KEPT {
        ended.pop_front();
    }
    ended.push_back(EndedThread { tid, name, cpu_ns });
}

/// The threads that ended (the last [`ENDED_KEPT`]), oldest first.
pub fn ended_threads() -> Vec<EndedThread> {
    let ended = ENDED.lock().unwrap_or_else(|e| e.into_inner());
    ended.iter().cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_that_ends_leaves_its_clock() {
        let t = std::thread::Builder::new()
            .name("cpu-test-ending".into())
            .spawn(|| {
                let tid = rustix::thread::gettid().as_raw_nonzero().get() as u32;
                let start = std::time::Instant::now();
                let mut x = 0u64;
                while start.elapsed() < std::time::Duration::from_millis(20) {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                }
                let used = thread_cpu_ns();
                record_end();
                (tid, used)
            })
            .expect("spawn");
        let (tid, used) = t.join().expect("join");
        let Some(used) = used else {
            // Not Linux: nothing is kept.
            assert!(ended_threads().iter().all(|e| e.name != "cpu-test-ending"));
            return;
        };
        let ended = ended_threads();
        let mine = ended
            .iter()
            .find(|e| e.tid == tid)
            .expect("the ended thread is remembered");
        assert_eq!(mine.name, "cpu-test-ending");
        assert!(mine.cpu_ns >= used, "{} < {used}", mine.cpu_ns);
    }
}
