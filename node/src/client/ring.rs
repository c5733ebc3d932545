//! The client's side of a circuit ring: it builds the onion, opens the
//! stream to the first hop, receives the ring's far end on its own
//! listener, then sends and receives job messages on it.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::circuit::server::Timed;
use futures::io::{AsyncReadExt, ReadHalf, WriteHalf};
use futures::StreamExt;
use libp2p::{PeerId, Stream};
use mixnn_crypto::cells::{
    CellKey, CellOpener, CellSealer, CellSuite, MessageCells, MessageReader, CELL_BYTES,
};
use mixnn_crypto::onion::{build_setup, peel_setup, HopSecrets, HopSpec};
use mixnn_crypto::replay::MemoryReplayCache;
use mixnn_crypto::OnionKeyPair;
use mixnn_model::DecodeLimits;
use rand::RngCore;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::circuit::payload::{open_error, ErrorCode, HopPayload, HopRole, JobMsg, ERROR_KEY};
use crate::circuit::wire::{self, FrameKind, WireError};
use crate::circuit::CIRCUIT_PROTOCOL;
use crate::network::Network;

/// One hop of a ring as the client knows it.
#[derive(Clone, Debug)]
pub struct RingHop {
    pub peer: PeerId,
    pub onion_key: [u8; 32],
    pub epoch: u64,
    /// What the hop does, for the client's messages ("mix", "layer host for stage 2").
    pub label: String,
    pub role: HopRole,
}

#[derive(Debug, Error)]
pub enum RingError {
    #[error("hop {index} ({label}, peer {peer}) reported: {detail}")]
    HopReported {
        index: usize,
        label: String,
        peer: PeerId,
        code: ErrorCode,
        detail: String,
    },
    #[error("the ring broke: {0}")]
    Broken(String),
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("circuit setup failed: {0}")]
    Setup(String),
    #[error("protocol violation: {0}")]
    Protocol(String),
}

impl RingError {
    /// The hop this error blames, if any: a hop that reports its next hop
    /// failed blames the next hop.
    pub fn blamed_hop(&self) -> Option<usize> {
        match self {
            RingError::HopReported { index, code, .. } => Some(match code {
                ErrorCode::NextHopFailed => index + 1,
                _ => *index,
            }),
            _ => None,
        }
    }
}

type Pending = Arc<Mutex<HashMap<[u8; 16], oneshot::Sender<(u64, Stream)>>>>;

/// Receives the far ends of the client's rings: the last hop of each ring
/// opens a stream to the client and sends the last onion layer, sealed to
/// the client's own key. One per client network: it owns the protocol's
/// inbound streams there.
pub struct EndListener {
    key: Arc<OnionKeyPair>,
    pending: Pending,
    cancel: CancellationToken,
}

pub const END_EPOCH: u64 = 0;

/// How long a ring whose stream broke waits for a hop's report of why:
/// a hop that refuses a message closes the circuit and reports, and the
/// close may reach the client before the report.
const REPORT_GRACE: Duration = Duration::from_secs(2);

impl EndListener {
    #[allow(clippy::result_large_err, reason = "cold error path")]
    pub fn start(network: &Network, cancel: CancellationToken) -> Result<Self, RingError> {
        let key = Arc::new(OnionKeyPair::generate(END_EPOCH, u64::MAX));
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let mut control = network.stream_control();
        let mut incoming = control
            .accept(CIRCUIT_PROTOCOL)
            .map_err(|e| RingError::Setup(format!("cannot accept circuit streams: {e}")))?;
        let (k, p, c) = (key.clone(), pending.clone(), cancel.clone());
        tokio::spawn(async move {
            let replay = Arc::new(Mutex::new(MemoryReplayCache::new(1024)));
            loop {
                let (_peer, mut stream) = tokio::select! {
                    biased;
                    _ = c.cancelled() => break,
                    n = incoming.next() => match n { Some(s) => s, None => break },
                };
                let (k, p, replay) = (k.clone(), p.clone(), replay.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let Ok(Ok((cid, FrameKind::Setup { .. }))) = tokio::time::timeout(
                        Duration::from_secs(10),
                        wire::read_frame(&mut stream, &mut buf),
                    )
                    .await
                    else {
                        return;
                    };
                    let peeled = {
                        let mut r = replay.lock().unwrap_or_else(|e| e.into_inner());
                        peel_setup(&buf, &k, &mut *r)
                    };
                    let Ok(peeled) = peeled else { return };
                    let Ok(HopPayload {
                        role: HopRole::End { tag },
                        ..
                    }) = HopPayload::decode(&peeled.payload)
                    else {
                        return;
                    };
                    let waiter = p.lock().unwrap_or_else(|e| e.into_inner()).remove(&tag);
                    if let Some(w) = waiter {
                        let _ = w.send((cid, stream));
                    }
                });
            }
        });
        Ok(Self {
            key,
            pending,
            cancel,
        })
    }

    pub fn public(&self) -> [u8; 32] {
        self.key.public()
    }
}

impl Drop for EndListener {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// A ring set up and ready for job messages.
pub struct Ring {
    pub hops: Vec<RingHop>,
    secrets: Vec<HopSecrets>,
    down: WriteHalf<Stream>,
    down_cid: u64,
    end: ReadHalf<Stream>,
    /// Nothing is written towards the last hop; held so the stream lives.
    _end_w: WriteHalf<Stream>,
    sealer: CellSealer,
    opener: CellOpener,
    reader: MessageReader,
    errors: mpsc::Receiver<Result<Vec<u8>, String>>,
    limits: DecodeLimits,
    buf: Vec<u8>,
    /// The cell frames of the message being sent (see `wire::CELL_FRAME_BYTES`).
    cells: Vec<u8>,
    /// Bytes sent and received in cells (for the run's breakdown).
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Time spent sealing and opening cells.
    pub crypto: Duration,
    /// Time spent encoding and decoding messages.
    pub codec: Duration,
    /// Longest wait for the first hop to take a message.
    io_timeout: Duration,
}

/// Keys of the ring's first and last segments, as the client holds them.
pub struct RingKeys {
    pub first_segment: [u8; 32],
    pub last_segment: [u8; 32],
    /// The cipher suite of the first segment's cells.
    pub first_suite: CellSuite,
    /// The cipher suite of the last segment's cells.
    pub last_suite: CellSuite,
}

impl Ring {
    /// Set up a ring through `hops` back to the client.
    pub async fn open(
        network: &Network,
        listener: &EndListener,
        hops: Vec<RingHop>,
        keys: RingKeys,
        limits: DecodeLimits,
        max_message: usize,
        timeout: Duration,
    ) -> Result<Ring, RingError> {
        let (first, last) = match (hops.first(), hops.last()) {
            (Some(f), Some(l)) => (f.clone(), l.clone()),
            _ => return Err(RingError::Setup("a ring needs at least one hop".into())),
        };
        let mut tag = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut tag);
        let me = network.peer_id().to_bytes();
        let mut specs = Vec::with_capacity(hops.len() + 1);
        for (i, h) in hops.iter().enumerate() {
            let next = hops.get(i + 1);
            let payload = HopPayload {
                next_epoch: next.map_or(END_EPOCH, |n| n.epoch),
                role: h.role.clone(),
            }
            .encode()
            .map_err(|e| RingError::Setup(format!("hop {i}: {e}")))?;
            specs.push(HopSpec {
                onion_key: h.onion_key,
                next_hop: Some(next.map_or(me.clone(), |n| n.peer.to_bytes())),
                payload,
            });
        }
        specs.push(HopSpec {
            onion_key: listener.public(),
            next_hop: None,
            payload: HopPayload {
                next_epoch: 0,
                role: HopRole::End { tag },
            }
            .encode()
            .map_err(|e| RingError::Setup(e.to_string()))?,
        });
        let (packet, secrets) = build_setup(&specs).map_err(|e| {
            RingError::Setup(format!(
                "{e} (the ring has {} hops counting the client; use fewer layers or a smaller --mixes)",
                specs.len()
            ))
        })?;

        // The last hop must be able to reach us: keep a connection to it.
        network.connect(last.peer, timeout).await.map_err(|e| {
            RingError::Setup(format!(
                "cannot reach the ring's last hop {}: {e}",
                last.peer
            ))
        })?;
        let (tx, end_rx) = oneshot::channel();
        listener
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(tag, tx);

        let mut control = network.stream_control();
        let stream =
            tokio::time::timeout(timeout, control.open_stream(first.peer, CIRCUIT_PROTOCOL))
                .await
                .map_err(|_| {
                    RingError::Setup(format!(
                        "the first hop {} did not answer in time",
                        first.peer
                    ))
                })?
                .map_err(|e| {
                    RingError::Setup(format!(
                        "cannot open a stream to the first hop {}: {e}",
                        first.peer
                    ))
                })?;
        let (down_r, mut down) = stream.split();
        let down_cid = rand::rngs::OsRng.next_u64();
        wire::write_setup(&mut down, down_cid, first.epoch, packet.as_bytes())
            .await
            .map_err(|e| RingError::Setup(e.to_string()))?;

        // Sealed errors come back on the first hop's stream.
        let (etx, mut errors) = mpsc::channel(4);
        tokio::spawn(error_reader(down_r, etx));

        let ring_hops = hops;
        let (end_cid, end_stream) = tokio::select! {
            r = tokio::time::timeout(timeout, end_rx) => match r {
                Ok(Ok(s)) => s,
                _ => {
                    listener.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&tag);
                    return Err(RingError::Setup(format!(
                        "the ring did not come back within {timeout:?}; its hops: {}",
                        ring_hops.iter().map(|h| format!("{} ({})", h.peer, h.label)).collect::<Vec<_>>().join(", ")
                    )));
                }
            },
            e = errors.recv() => {
                listener.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&tag);
                let err = attribute(&ring_hops, &secrets, e);
                return Err(err);
            }
        };
        let _ = end_cid;
        let (end, end_w) = end_stream.split();
        Ok(Ring {
            hops: ring_hops,
            secrets,
            down,
            down_cid,
            end,
            _end_w: end_w,
            sealer: CellSealer::with_suite(
                &CellKey::from_bytes(keys.first_segment),
                keys.first_suite,
            ),
            opener: CellOpener::with_suite(
                &CellKey::from_bytes(keys.last_segment),
                keys.last_suite,
            ),
            reader: MessageReader::new(max_message),
            errors,
            limits,
            buf: Vec::new(),
            cells: Vec::new(),
            bytes_sent: 0,
            bytes_received: 0,
            crypto: Duration::ZERO,
            codec: Duration::ZERO,
            io_timeout: timeout.max(Duration::from_secs(30)),
        })
    }

    /// The secrets this client shares with hop `i`.
    pub fn secrets(&self, i: usize) -> Option<&HopSecrets> {
        self.secrets.get(i)
    }

    pub async fn send(&mut self, msg: &JobMsg) -> Result<(), RingError> {
        let t = std::time::Instant::now();
        // Encoded straight into each cell as it is sealed; the codec's
        // share is timed apart from the cipher's.
        let codec_nanos = AtomicU64::new(0);
        let mut source = Timed {
            inner: msg
                .encoding()
                .map_err(|e| RingError::Protocol(e.to_string()))?,
            spent: &codec_nanos,
        };
        let mut message = MessageCells::from_source(&mut self.sealer, &mut source)
            .map_err(|e| RingError::Protocol(e.to_string()))?;
        let total = message.total();
        // Cell frames, each sealed behind room for its header. Every byte
        // is overwritten, so the buffer is not cleared first.
        self.cells.resize(total * wire::CELL_FRAME_BYTES, 0);
        for frame in self.cells.chunks_mut(wire::CELL_FRAME_BYTES) {
            message
                .seal_next(wire::cell_of_mut(frame))
                .map_err(|e| RingError::Protocol(e.to_string()))?;
        }
        let encoding = Duration::from_nanos(codec_nanos.into_inner());
        self.codec += encoding;
        self.crypto += t.elapsed().saturating_sub(encoding);
        let write = tokio::time::timeout(
            self.io_timeout,
            wire::write_cell_frames(&mut self.down, self.down_cid, &mut self.cells),
        );
        tokio::select! {
            r = write => match r {
                Err(_) => return Err(RingError::Timeout(self.io_timeout)),
                Ok(Err(e)) => {
                    // A hop that refused the message may still be saying why.
                    if let Ok(Some(report)) =
                        tokio::time::timeout(REPORT_GRACE, self.errors.recv()).await
                    {
                        return Err(attribute(&self.hops, &self.secrets, Some(report)));
                    }
                    return Err(RingError::Broken(format!("sending to the first hop: {e}")));
                }
                Ok(Ok(())) => {}
            },
            e = self.errors.recv() => return Err(attribute(&self.hops, &self.secrets, e)),
        }
        self.bytes_sent += (total * CELL_BYTES) as u64;
        Ok(())
    }

    /// The next message from the ring's end, or the first error a hop
    /// reports, or a timeout.
    pub async fn recv(&mut self, timeout: Duration) -> Result<JobMsg, RingError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let frame = tokio::select! {
                biased;
                e = self.errors.recv() => return Err(attribute(&self.hops, &self.secrets, e)),
                f = tokio::time::timeout_at(deadline, wire::read_frame(&mut self.end, &mut self.buf)) => f,
            };
            match frame {
                Err(_) => return Err(RingError::Timeout(timeout)),
                Ok(Err(WireError::Closed)) => {
                    // A hop before us may still be reporting why.
                    if let Ok(Some(e)) =
                        tokio::time::timeout(REPORT_GRACE, self.errors.recv()).await
                    {
                        return Err(attribute(&self.hops, &self.secrets, Some(e)));
                    }
                    return Err(RingError::Broken(format!(
                        "the last hop {} ({}) closed the ring",
                        self.hops
                            .last()
                            .map(|h| h.peer.to_string())
                            .unwrap_or_default(),
                        self.hops.last().map(|h| h.label.as_str()).unwrap_or("")
                    )));
                }
                Ok(Err(e)) => {
                    return Err(RingError::Broken(format!("reading from the last hop: {e}")))
                }
                Ok(Ok((_, FrameKind::Cell))) => {
                    self.bytes_received += self.buf.len() as u64;
                    let t = std::time::Instant::now();
                    let r = self.reader.push(&mut self.opener, &mut self.buf);
                    self.crypto += t.elapsed();
                    match r {
                        Ok(None) => continue,
                        Ok(Some(m)) => {
                            let msg = JobMsg::decode(&m, self.limits)
                                .map_err(|e| RingError::Protocol(e.to_string()));
                            self.reader.recycle(m);
                            return msg;
                        }
                        Err(e) => {
                            return Err(RingError::Protocol(format!(
                                "a cell from the ring's end: {e}"
                            )))
                        }
                    }
                }
                Ok(Ok((_, kind))) => {
                    return Err(RingError::Protocol(format!(
                        "unexpected {} frame",
                        kind.name()
                    )))
                }
            }
        }
    }

    /// Close the ring cleanly: every hop forwards the teardown and ends.
    pub async fn teardown(mut self) {
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            wire::write_teardown(&mut self.down, self.down_cid),
        )
        .await;
        // Wait briefly for the teardown to come around.
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            wire::read_frame(&mut self.end, &mut self.buf),
        )
        .await;
    }
}

async fn error_reader(mut r: ReadHalf<Stream>, tx: mpsc::Sender<Result<Vec<u8>, String>>) {
    let mut buf = Vec::new();
    match wire::read_frame(&mut r, &mut buf).await {
        Ok((_, FrameKind::Error)) => {
            let _ = tx.send(Ok(buf)).await;
        }
        Ok((_, kind)) => {
            let _ = tx
                .send(Err(format!(
                    "unexpected {} frame from the first hop",
                    kind.name()
                )))
                .await;
        }
        Err(WireError::Closed) => {
            let _ = tx.send(Err("the first hop closed the ring".into())).await;
        }
        Err(e) => {
            let _ = tx
                .send(Err(format!("the stream to the first hop broke: {e}")))
                .await;
        }
    }
}

/// Find which hop sealed an error report.
fn attribute(
    hops: &[RingHop],
    secrets: &[HopSecrets],
    e: Option<Result<Vec<u8>, String>>,
) -> RingError {
    match e {
        Some(Ok(sealed)) => {
            for (i, (h, s)) in hops.iter().zip(secrets).enumerate() {
                if let Ok(r) = open_error(&s.key(ERROR_KEY), &sealed) {
                    let blamed = if r.code == ErrorCode::NextHopFailed {
                        hops.get(i + 1)
                            .map(|n| format!("; the next hop is {} ({})", n.peer, n.label))
                            .unwrap_or_else(|| "; the next hop is this client".into())
                    } else {
                        String::new()
                    };
                    return RingError::HopReported {
                        index: i,
                        label: h.label.clone(),
                        peer: h.peer,
                        code: r.code,
                        detail: format!("{}{blamed}", r.detail),
                    };
                }
            }
            RingError::Protocol("an error report that no hop of the ring sealed".into())
        }
        Some(Err(reason)) => RingError::Broken(format!(
            "{reason} (first hop {} ({}))",
            hops.first().map(|h| h.peer.to_string()).unwrap_or_default(),
            hops.first().map(|h| h.label.as_str()).unwrap_or("")
        )),
        None => RingError::Broken("the error channel closed".into()),
    }
}
