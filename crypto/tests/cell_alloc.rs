//! The cell path allocates nothing per cell: once its buffers exist,
//! sealing messages cell by cell into pooled cell buffers, opening them in
//! place and reassembling them into a recycled message buffer makes no
//! call to the allocator at all. A counting global allocator shows it.
//!
//! One test in this binary, so no other test's allocations are counted.

use std::alloc::System;

use mixnn_crypto::cells::{
    CellKey, CellOpener, CellSealer, MessageCells, MessageReader, CELL_BYTES, CELL_PAYLOAD,
};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Seals `msg` into cells taken from `pool` (and put back), opening each
/// as it is sealed, as a hop's writer and the next hop's reader would.
/// Returns the message the reader completed, if any.
fn round_trip(
    sealer: &mut CellSealer,
    opener: &mut CellOpener,
    reader: &mut MessageReader,
    pool: &mut Vec<Vec<u8>>,
    msg: &[u8],
) -> Option<Vec<u8>> {
    let mut cells = MessageCells::new(sealer, msg).ok()?;
    let mut done = None;
    while cells.remaining() > 0 {
        let mut cell = pool.pop()?;
        cells.seal_next(&mut cell).ok()?;
        if let Some(m) = reader.push(opener, &mut cell).ok()? {
            done = Some(m);
        }
        pool.push(cell);
    }
    done
}

#[test]
fn sealing_and_opening_cells_allocates_nothing_per_cell() {
    let key = CellKey::from_bytes([5; 32]);
    let mut sealer = CellSealer::new(&key);
    let mut opener = CellOpener::new(&key);
    let mut reader = MessageReader::new(4 << 20);
    let mut pool: Vec<Vec<u8>> = (0..4).map(|_| vec![0u8; CELL_BYTES]).collect();
    // Messages of several sizes: one cell, a 16-cell bucket (~1 MiB), and
    // one with padding cells.
    let msgs: Vec<Vec<u8>> = [
        100usize,
        16 * CELL_PAYLOAD - 8,
        3 * CELL_PAYLOAD + 5,
        1 << 20,
    ]
    .iter()
    .enumerate()
    .map(|(i, &n)| (0..n).map(|j| (i * 31 + j * 7) as u8).collect())
    .collect();

    // The counter works: an allocation in a region is seen.
    let probe = Region::new(GLOBAL);
    let v = std::hint::black_box(vec![1u8; 4096]);
    assert!(probe.change().allocations >= 1);
    drop(v);

    // Warm up: the reader's message buffer grows to the largest message.
    for m in &msgs {
        let got = round_trip(&mut sealer, &mut opener, &mut reader, &mut pool, m);
        let got = got.expect("the message comes back");
        assert_eq!(&got, m);
        reader.recycle(got);
    }

    let region = Region::new(GLOBAL);
    let mut cells = 0usize;
    let mut equal = true;
    for _ in 0..10 {
        for m in &msgs {
            cells += mixnn_crypto::cells::message_cells(m.len());
            let got = round_trip(&mut sealer, &mut opener, &mut reader, &mut pool, m);
            let Some(got) = got else {
                equal = false;
                break;
            };
            equal &= got == *m;
            reader.recycle(got);
        }
    }
    let stats = region.change();
    assert!(equal, "every message came back whole");
    assert!(cells > 300, "{cells} cells");
    assert_eq!(
        (stats.allocations, stats.reallocations),
        (0, 0),
        "{cells} cells sealed and opened: {stats:?}"
    );
}
