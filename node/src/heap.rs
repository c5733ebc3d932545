//! How the process takes memory from the kernel: in base pages, not
//! transparent huge pages.
//!
//! A training step takes and frees buffers of megabytes (activations,
//! gradients, messages, cells) on a dozen threads. mimalloc asks for huge
//! pages on its arenas (`madvise(MADV_HUGEPAGE)`) and hands idle ranges
//! back to the kernel after a second. Each range touched again then faults
//! in a whole 2 MiB page, zeroed, where the step needed a few KiB of it.
//! Measured on a 2-core AMD EPYC (Zen 3) VM, `bench paper`, alternating
//! runs (12 with huge pages, 8 without): with them every run faulted in
//! about 430 huge pages, the parties spent a median 46.2 ms of CPU per
//! step and the process 19.2 s in all; without, 44.5 ms and 17.7 s. Base
//! pages cost more faults (about 190,000 against 20,000 a run), each one
//! cheap.
//!
//! The setting is the process's own (`PR_SET_THP_DISABLE`): it leaves the
//! machine's policy for every other program alone, and children inherit
//! it.

/// Whether this process takes transparent huge pages (Linux only; `None`
/// where the kernel does not say).
pub fn huge_pages_disabled() -> Option<bool> {
    #[cfg(target_os = "linux")]
    {
        rustix::thread::transparent_huge_pages_are_disabled().ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// Turn transparent huge pages off for this process. Call it first thing in
/// `main`; it applies to memory already mapped as well. A kernel that
/// refuses (or another OS) leaves the process as it was, which only costs
/// speed.
pub fn no_huge_pages() {
    #[cfg(target_os = "linux")]
    {
        if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
            tracing::debug!("transparent huge pages stay on: {e}");
        }
    }
}

/// For reports: how the heap takes its pages.
pub fn describe() -> &'static str {
    match huge_pages_disabled() {
        Some(true) => "the heap in base pages (transparent huge pages off for this process)",
        Some(false) => "the heap may take transparent huge pages",
        None => "the heap's page size is the system's choice",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn huge_pages_are_off_after_the_call_and_the_kernel_says_so() {
        no_huge_pages();
        assert_eq!(huge_pages_disabled(), Some(true));
        assert!(describe().contains("off"));
        // The kernel reports it per process as well.
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        if let Some(line) = status.lines().find(|l| l.starts_with("THP_enabled:")) {
            assert_eq!(line.split_whitespace().nth(1), Some("0"), "{line}");
        }
    }
}
