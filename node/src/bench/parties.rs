//! What each party of a training run costs, and what a step would take with
//! one machine per party.
//!
//! `mixnn bench paper` runs every volunteer on threads of its own, so the
//! CPU each one used can be read off its threads (and its slot workers',
//! with their share of the process's matrix-product pool), and the
//! client's is the rest of the process. From the CPU per step, the
//! bytes each party sends per step and the route, [`project`] gives the
//! step time if every party had its own core and the links between them had
//! a given latency and bandwidth. It is a projection, not a measurement:
//!
//! - every party's CPU per step counts in full, one after the other (the
//!   parties' work does not overlap; the cells of one message do overlap in
//!   reality, so this leans pessimistic);
//! - the client and the layer hosts send whole messages (store and
//!   forward): their bytes per step cross their link at the bandwidth;
//! - a mix forwards cell by cell: each message through it adds one cell's
//!   time on its outgoing link;
//! - every link crossed in a step (both rings) adds the latency once.

use serde::Serialize;

/// A party of the run and what it used per training step.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct PartyCost {
    /// "client", "host of stage 2", "mix".
    pub party: String,
    /// CPU milliseconds per step (its threads and its slot workers').
    pub cpu_ms: f64,
    /// Bytes it sent per step (cells, with their frame headers left out).
    pub bytes_sent: f64,
    /// Messages per step it forwards cell by cell (mixes), 0 for the
    /// parties that send whole messages.
    pub relayed_messages: f64,
}

/// The assumptions of a projection.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct Links {
    /// One-way latency of every link, milliseconds.
    pub latency_ms: f64,
    /// Bandwidth of every link, bits per second.
    pub bandwidth_bits: f64,
}

impl Default for Links {
    fn default() -> Self {
        Self {
            latency_ms: 1.0,
            bandwidth_bits: 1e9,
        }
    }
}

/// The projected step time with one machine per party, and its parts.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Projection {
    pub links: Links,
    /// Links a step crosses (both rings).
    pub links_per_step: usize,
    pub cpu_ms: f64,
    pub latency_ms: f64,
    pub transfer_ms: f64,
    /// The projected step time.
    pub step_ms: f64,
}

/// The step time of `parties` on their own machines (see the module docs),
/// with `links_per_step` links crossed and cells of `cell_bytes`.
pub fn project(
    parties: &[PartyCost],
    links_per_step: usize,
    cell_bytes: usize,
    links: Links,
) -> Projection {
    let bytes_per_ms = links.bandwidth_bits / 8.0 / 1000.0;
    let cpu_ms: f64 = parties.iter().map(|p| p.cpu_ms).sum();
    let transfer_ms: f64 = parties
        .iter()
        .map(|p| {
            if p.relayed_messages > 0.0 {
                p.relayed_messages * cell_bytes as f64 / bytes_per_ms
            } else {
                p.bytes_sent / bytes_per_ms
            }
        })
        .sum();
    let latency_ms = links_per_step as f64 * links.latency_ms;
    Projection {
        links,
        links_per_step,
        cpu_ms,
        latency_ms,
        transfer_ms,
        step_ms: cpu_ms + latency_ms + transfer_ms,
    }
}

/// Batch latencies and throughput of inference, through a circuit or local.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Latency {
    pub batches: usize,
    pub median_ms: f64,
    pub p99_ms: f64,
    pub examples_per_second: f64,
}

impl Latency {
    /// From each batch's time in seconds and the examples in all of them.
    pub fn from_batches(seconds: &[f64], examples: usize) -> Latency {
        let mut ms: Vec<f64> = seconds.iter().map(|s| s * 1000.0).collect();
        ms.sort_by(f64::total_cmp);
        let total: f64 = seconds.iter().sum();
        Latency {
            batches: ms.len(),
            median_ms: percentile(&ms, 50.0),
            p99_ms: percentile(&ms, 99.0),
            examples_per_second: if total > 0.0 {
                examples as f64 / total
            } else {
                0.0
            },
        }
    }
}

/// The `p`th percentile of sorted `v` (nearest rank); NaN when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median time between consecutive steps, in milliseconds, from the
/// moment each step finished: a run's steady step time, which the run's
/// fixed costs (setup, checkpoints, the evaluation at its end) leave out
/// and a moment of the machine's noise barely moves. `None` under three
/// steps.
pub fn median_step_ms(finished: &[std::time::Instant]) -> Option<f64> {
    if finished.len() < 3 {
        return None;
    }
    let gaps: Vec<f64> = finished
        .windows(2)
        .map(|w| w[1].saturating_duration_since(w[0]).as_secs_f64() * 1000.0)
        .collect();
    Some(spread(&gaps).1)
}

/// Smallest, median and largest of `v` (NaN when empty).
pub fn spread(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match (s.first(), s.last()) {
        (Some(&lo), Some(&hi)) => {
            let mid = s.len() / 2;
            let median = if s.len() % 2 == 1 {
                s[mid]
            } else {
                (s[mid - 1] + s[mid]) / 2.0
            };
            (lo, median, hi)
        }
        _ => (f64::NAN, f64::NAN, f64::NAN),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn party(name: &str, cpu_ms: f64, bytes_sent: f64, relayed: f64) -> PartyCost {
        PartyCost {
            party: name.into(),
            cpu_ms,
            bytes_sent,
            relayed_messages: relayed,
        }
    }

    #[test]
    fn the_steady_step_is_the_median_gap_between_steps() {
        let t0 = std::time::Instant::now();
        let at = |ms: u64| t0 + std::time::Duration::from_millis(ms);
        // Steps every 10 ms, one checkpoint (50 ms) among them: the median
        // gap is the step, whatever the checkpoint took.
        let finished = [at(100), at(110), at(120), at(170), at(180), at(190)];
        assert_eq!(median_step_ms(&finished), Some(10.0));
        assert_eq!(median_step_ms(&finished[..2]), None);
    }

    #[test]
    fn a_projection_adds_cpu_latency_and_transfers() {
        // A client and one host with a mix either side: 1 MB out and back.
        let parties = [
            party("client", 2.0, 1_000_000.0, 0.0),
            party("mix", 0.5, 1_000_000.0, 1.0),
            party("host", 3.0, 1_000_000.0, 0.0),
            party("mix", 0.5, 1_000_000.0, 1.0),
        ];
        let links = Links {
            latency_ms: 1.0,
            bandwidth_bits: 8e9, // 1 GB/s: 1 MB takes 1 ms
        };
        let p = project(&parties, 4, 100_000, links);
        assert_eq!(p.cpu_ms, 6.0);
        assert_eq!(p.latency_ms, 4.0);
        // Two whole messages (1 ms each) and two relayed cells (0.1 ms each).
        assert!((p.transfer_ms - 2.2).abs() < 1e-9, "{}", p.transfer_ms);
        assert!((p.step_ms - 12.2).abs() < 1e-9);
        // Slower links, slower steps.
        let slow = project(
            &parties,
            4,
            100_000,
            Links {
                latency_ms: 10.0,
                bandwidth_bits: 8e8,
            },
        );
        assert!((slow.step_ms - (6.0 + 40.0 + 22.0)).abs() < 1e-9);
        assert_eq!(Links::default().bandwidth_bits, 1e9);
    }

    #[test]
    fn percentiles_and_spreads() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert!(percentile(&[], 50.0).is_nan());
        assert_eq!(spread(&[3.0, 1.0, 2.0]), (1.0, 2.0, 3.0));
        assert_eq!(spread(&[4.0, 1.0, 2.0, 3.0]), (1.0, 2.5, 4.0));
        assert!(spread(&[]).0.is_nan());
        let l = Latency::from_batches(&[0.002, 0.001, 0.003], 300);
        assert_eq!(l.batches, 3);
        assert!((l.median_ms - 2.0).abs() < 1e-9, "{}", l.median_ms);
        assert!((l.p99_ms - 3.0).abs() < 1e-9, "{}", l.p99_ms);
        assert!((l.examples_per_second - 50_000.0).abs() < 1e-6);
    }
}
