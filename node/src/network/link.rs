//! Link security: how a connection between two nodes is authenticated and
//! encrypted, beneath the onion encryption of the cells it carries.
//!
//! A connection offers TLS 1.3 first (`/tls/1.0.0`, the libp2p TLS
//! handshake) and Noise second (`/noise`). multistream-select settles on the
//! first protocol both ends speak, so a peer that knows only Noise still
//! connects, one round trip later, and one that knows only TLS connects too.
//! Either way the remote's peer ID comes from a signature by its identity
//! key, and the swarm checks it against the ID it dialled.
//!
//! TLS comes first for speed: every byte of every cell crosses a link, and
//! libp2p-noise seals with ChaCha20-Poly1305 only. Where the CPU has AES
//! instructions our TLS offer puts AES-256-GCM first, several times faster
//! per byte there; elsewhere ChaCha20-Poly1305 leads. The listener follows
//! the dialer's order.

use std::net::{IpAddr, Ipv4Addr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use futures::future::{self, BoxFuture};
use futures::{AsyncRead, AsyncWrite, FutureExt};
use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade, UpgradeInfo};
use libp2p::identity::Keypair;
use libp2p::tls::certificate;
use libp2p::{noise, PeerId};

use crate::metrics::Metrics;
use mixnn_crypto::aead::{aes_gcm_backend, Backend};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme,
    SupportedCipherSuite,
};

/// The libp2p TLS handshake's protocol name.
pub const TLS_PROTOCOL: &str = "/tls/1.0.0";
/// The ALPN value the libp2p TLS handshake requires.
const ALPN: &[u8] = b"libp2p";

/// The stream a secured connection yields: TLS or Noise.
pub type LinkStream<C> =
    future::Either<Coalesce<futures_rustls::TlsStream<ReadAhead<C>>>, noise::Output<C>>;

/// The most bytes [`Coalesce`] holds before it writes them on.
const COALESCE_BYTES: usize = 64 * 1024;
/// The most bytes [`ReadAhead`] takes from the socket in one read: a whole
/// cell frame's records and the start of the next.
const READ_AHEAD_BYTES: usize = 128 * 1024;
/// The most bytes TLS takes to seal before they are on the socket. rustls's
/// default, 64 KiB, is a few bytes short of a cell frame: each frame's last
/// bytes went as a record and a system call of their own, and woke the
/// next hop a second time. Twice a frame holds one whole with room to spare.
const TLS_BUFFER_BYTES: usize = 2 * crate::network::mux::FRAME_BYTES;

/// A TCP segment's payload at a 64 KiB MTU (loopback's) under IPv6 with
/// TCP timestamps, the smaller of the two families: 65,536 less 40, 20
/// and 12 bytes of headers.
const SEGMENT_64K_BYTES: usize = 65_536 - 40 - 20 - 12;

/// Bytes on the wire of `plaintext` bytes written through TLS 1.3: records
/// of at most 16 KiB, each with a 5-byte header, its content type and a
/// 16-byte tag.
const fn tls_wire_bytes(plaintext: usize) -> usize {
    plaintext + plaintext.div_ceil(16 * 1024) * (5 + 1 + 16)
}

/// A cell frame under its multiplexer header (12 bytes) fits one segment
/// (see [`mixnn_crypto::cells::CELL_BYTES`]).
const _: () =
    assert!(tls_wire_bytes(12 + crate::circuit::wire::CELL_FRAME_BYTES) <= SEGMENT_64K_BYTES);

/// Why a connection could not be secured.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("TLS handshake: {0}")]
    Tls(std::io::Error),
    #[error("TLS certificate: {0}")]
    Certificate(String),
    #[error("Noise handshake: {0}")]
    Noise(#[from] noise::Error),
}

/// The TLS 1.3 suites we offer, most wanted first: AES-GCM leads where the
/// CPU has AES instructions, ChaCha20-Poly1305 where it has not.
///
/// AES-GCM comes from the library the cells use on this CPU
/// ([`aes_gcm_backend`]): ring's VAES code seals a 64 KiB record about
/// twice as fast as aws-lc's AES-NI code on a CPU with VAES but without
/// AVX-512, and aws-lc's AVX-512 code is the faster where it runs. Every
/// byte of every cell crosses a link sealed once and opened once.
/// ChaCha20-Poly1305 is aws-lc's. The bytes on the wire are TLS 1.3's
/// either way.
pub fn cipher_suites(aes_in_hardware: bool) -> Vec<SupportedCipherSuite> {
    use rustls::crypto::aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256;
    let [aes256, aes128] = if aes_gcm_backend() == Backend::Ring {
        use rustls::crypto::ring::cipher_suite as ring;
        [
            ring::TLS13_AES_256_GCM_SHA384,
            ring::TLS13_AES_128_GCM_SHA256,
        ]
    } else {
        use aws_lc_rs::cipher_suite as lc;
        [lc::TLS13_AES_256_GCM_SHA384, lc::TLS13_AES_128_GCM_SHA256]
    };
    if aes_in_hardware {
        vec![aes256, aes128, TLS13_CHACHA20_POLY1305_SHA256]
    } else {
        vec![TLS13_CHACHA20_POLY1305_SHA256, aes256, aes128]
    }
}

/// The TLS key exchanges we offer, most wanted first: X25519, as Noise
/// and the cells' onion layers use, then the others libp2p peers may ask
/// for. The post-quantum hybrid comes last: a link carries only cells
/// already sealed under X25519-agreed keys, so its larger keys would buy
/// little.
pub fn key_exchanges() -> Vec<&'static dyn rustls::crypto::SupportedKxGroup> {
    use aws_lc_rs::kx_group::{SECP256R1, SECP384R1, X25519, X25519MLKEM768};
    vec![X25519, SECP256R1, SECP384R1, X25519MLKEM768]
}

/// Whether this CPU runs AES-GCM in hardware (the TLS offer leads with
/// AES-256-GCM there, and the node offers AES-256-GCM cells).
pub use mixnn_crypto::aead::aes_in_hardware;

/// The security upgrade of every connection: TLS first, Noise second.
#[derive(Clone)]
pub struct LinkSecurity {
    tls: TlsLink,
    noise: noise::Config,
    metrics: Metrics,
}

impl LinkSecurity {
    /// Counts each secured connection in `metrics.links_secured`.
    pub fn new(key: &Keypair, metrics: Metrics) -> Result<Self, LinkError> {
        Ok(Self {
            tls: TlsLink::new(key, aes_in_hardware())?,
            noise: noise::Config::new(key)?,
            metrics,
        })
    }
}

/// The name a TLS connection is counted under: its cipher suite.
fn tls_label(state: &rustls::CommonState) -> String {
    state
        .negotiated_cipher_suite()
        .map_or_else(|| "tls".to_string(), |s| format!("{:?}", s.suite()))
}

impl UpgradeInfo for LinkSecurity {
    type Info = &'static str;
    type InfoIter = std::vec::IntoIter<&'static str>;

    fn protocol_info(&self) -> Self::InfoIter {
        let mut names = vec![TLS_PROTOCOL];
        names.extend(self.noise.protocol_info());
        names.into_iter()
    }
}

impl<C> InboundConnectionUpgrade<C> for LinkSecurity
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = (PeerId, LinkStream<C>);
    type Error = LinkError;
    type Future = BoxFuture<'static, Result<Self::Output, LinkError>>;

    fn upgrade_inbound(self, socket: C, name: Self::Info) -> Self::Future {
        let metrics = self.metrics;
        if name == TLS_PROTOCOL {
            let acceptor = futures_rustls::TlsAcceptor::from(self.tls.server);
            async move {
                let mut stream = acceptor
                    .accept(ReadAhead::new(socket))
                    .await
                    .map_err(LinkError::Tls)?;
                stream.get_mut().1.set_buffer_limit(Some(TLS_BUFFER_BYTES));
                tls_secured(&metrics, stream.into())
            }
            .boxed()
        } else {
            noise_secured(metrics, self.noise.upgrade_inbound(socket, name)).boxed()
        }
    }
}

impl<C> OutboundConnectionUpgrade<C> for LinkSecurity
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = (PeerId, LinkStream<C>);
    type Error = LinkError;
    type Future = BoxFuture<'static, Result<Self::Output, LinkError>>;

    fn upgrade_outbound(self, socket: C, name: Self::Info) -> Self::Future {
        let metrics = self.metrics;
        if name == TLS_PROTOCOL {
            let connector = futures_rustls::TlsConnector::from(self.tls.client);
            async move {
                // The libp2p TLS handshake sends no server name.
                let unnamed = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::UNSPECIFIED).into());
                let mut stream = connector
                    .connect(unnamed, ReadAhead::new(socket))
                    .await
                    .map_err(LinkError::Tls)?;
                stream.get_mut().1.set_buffer_limit(Some(TLS_BUFFER_BYTES));
                tls_secured(&metrics, stream.into())
            }
            .boxed()
        } else {
            noise_secured(metrics, self.noise.upgrade_outbound(socket, name)).boxed()
        }
    }
}

/// A finished TLS handshake, either side: the peer it proved, counted under
/// its cipher suite.
fn tls_secured<C>(
    metrics: &Metrics,
    stream: futures_rustls::TlsStream<ReadAhead<C>>,
) -> Result<(PeerId, LinkStream<C>), LinkError> {
    let state = stream.get_ref().1;
    let peer = presented_peer(state.peer_certificates())?;
    metrics.link_secured(&tls_label(state));
    Ok((peer, future::Either::Left(Coalesce::new(stream))))
}

/// A Noise handshake, either side, counted once it succeeds.
async fn noise_secured<C>(
    metrics: Metrics,
    handshake: impl std::future::Future<Output = Result<(PeerId, noise::Output<C>), noise::Error>>,
) -> Result<(PeerId, LinkStream<C>), LinkError> {
    let (peer, stream) = handshake.await?;
    metrics.link_secured("noise");
    Ok((peer, future::Either::Right(stream)))
}

/// Gathers the small writes of the multiplexer above a TLS stream into one
/// write per flush.
///
/// yamux writes each frame's 12-byte header and its body apart, then
/// flushes. Straight onto TLS, that is two records and two system calls
/// per frame, and the peer's thread woken twice; through this buffer it is
/// one write of both (Noise gathers the same way inside its own frames).
/// A body too large to hold goes on in one vectored write with what is
/// held before it. Reads pass through.
pub struct Coalesce<S> {
    inner: S,
    buf: Vec<u8>,
    /// How much of `buf` has been written on.
    done: usize,
}

impl<S> Coalesce<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            done: 0,
        }
    }
}

impl<S: AsyncWrite + Unpin> Coalesce<S> {
    /// Writes what the buffer holds on to the inner stream.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.done < self.buf.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.done..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()))
                }
                Poll::Ready(Ok(n)) => self.done += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        self.buf.clear();
        self.done = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Coalesce<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_read(cx, out)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Coalesce<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        loop {
            if this.buf.len() + data.len() <= COALESCE_BYTES {
                this.buf.extend_from_slice(data);
                return Poll::Ready(Ok(data.len()));
            }
            let held = this.buf.len() - this.done;
            if held == 0 {
                this.buf.clear();
                this.done = 0;
                if data.len() < COALESCE_BYTES {
                    continue;
                }
                return Pin::new(&mut this.inner).poll_write(cx, data);
            }
            // A large write (a whole frame body): what is held (its
            // header) and the body go on together, without a copy.
            let parts = [
                std::io::IoSlice::new(&this.buf[this.done..]),
                std::io::IoSlice::new(data),
            ];
            match ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, &parts))? {
                0 => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
                n if n > held => {
                    this.buf.clear();
                    this.done = 0;
                    return Poll::Ready(Ok(n - held));
                }
                n => this.done += n,
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

/// Reads the socket in large pieces beneath TLS.
///
/// rustls asks for 4 KiB at a time, so a 16 KiB record took five reads
/// from the socket, each a system call, and on TCP each read may send a
/// window update back. Through this buffer one read takes up to 64 KiB
/// and rustls's small reads are served from memory. Writes pass through.
pub struct ReadAhead<C> {
    inner: C,
    buf: Vec<u8>,
    /// The unread bytes are `buf[start..end]`.
    start: usize,
    end: usize,
}

impl<C> ReadAhead<C> {
    fn new(inner: C) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            start: 0,
            end: 0,
        }
    }
}

impl<C: AsyncRead + Unpin> AsyncRead for ReadAhead<C> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if this.start == this.end {
            if out.len() >= READ_AHEAD_BYTES {
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            if this.buf.len() < READ_AHEAD_BYTES {
                this.buf.resize(READ_AHEAD_BYTES, 0);
            }
            let n = ready!(Pin::new(&mut this.inner).poll_read(cx, &mut this.buf))?;
            this.start = 0;
            this.end = n;
        }
        let n = out.len().min(this.end - this.start);
        out[..n].copy_from_slice(&this.buf[this.start..this.start + n]);
        this.start += n;
        Poll::Ready(Ok(n))
    }
}

impl<C: AsyncWrite + Unpin> AsyncWrite for ReadAhead<C> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

/// Both sides of the TLS handshake for one identity.
#[derive(Clone)]
struct TlsLink {
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
}

impl TlsLink {
    fn new(key: &Keypair, aes_in_hardware: bool) -> Result<Self, LinkError> {
        let provider = Arc::new(CryptoProvider {
            cipher_suites: cipher_suites(aes_in_hardware),
            kx_groups: key_exchanges(),
            ..aws_lc_rs::default_provider()
        });
        // A fresh certificate key, signed by the identity key inside the
        // libp2p extension; it lives as long as this node.
        let (cert, cert_key) = certificate::generate(key)
            .map_err(|e| LinkError::Certificate(format!("generate: {e}")))?;
        // rustls's own loaders would parse the certificate as a web PKI one
        // and refuse the libp2p extension, which is marked critical.
        let signer = aws_lc_rs::sign::any_ecdsa_type(&cert_key)
            .map_err(|e| LinkError::Certificate(e.to_string()))?;
        let ours = Arc::new(OurCertificate(Arc::new(CertifiedKey::new(
            vec![cert],
            signer,
        ))));
        let verifier = Arc::new(PeerCertVerifier);
        let tls13 = &[&rustls::version::TLS13];

        let mut client = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(tls13)
            .map_err(|e| LinkError::Certificate(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone())
            .with_client_cert_resolver(ours.clone());
        client.alpn_protocols = vec![ALPN.to_vec()];

        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(tls13)
            .map_err(|e| LinkError::Certificate(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(ours);
        server.alpn_protocols = vec![ALPN.to_vec()];

        Ok(Self {
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }
}

/// Our certificate, presented on both sides of every handshake.
#[derive(Debug)]
struct OurCertificate(Arc<CertifiedKey>);

impl ResolvesClientCert for OurCertificate {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for OurCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// The peer ID behind the one certificate a verified handshake holds.
fn presented_peer(certs: Option<&[CertificateDer<'_>]>) -> Result<PeerId, LinkError> {
    match certs {
        Some([cert]) => certificate::parse(cert)
            .map(|c| c.peer_id())
            .map_err(|e| LinkError::Certificate(e.to_string())),
        _ => Err(LinkError::Certificate(
            "the handshake ended without exactly one certificate".into(),
        )),
    }
}

/// Checks a libp2p TLS certificate on either side of the handshake: exactly
/// one, self-signed, carrying a valid signature by the peer's identity key;
/// and the handshake's signature made with that certificate's key.
#[derive(Debug)]
struct PeerCertVerifier;

impl PeerCertVerifier {
    fn check_chain(
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<PeerId, rustls::Error> {
        if !intermediates.is_empty() {
            return Err(rustls::Error::General(
                "a libp2p peer presents exactly one certificate".into(),
            ));
        }
        certificate::parse(end_entity)
            .map(|c| c.peer_id())
            .map_err(|e| rustls::Error::General(format!("libp2p certificate: {e}")))
    }

    fn check_signature(
        message: &[u8],
        cert: &CertificateDer<'_>,
        scheme: SignatureScheme,
        signature: &[u8],
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let cert = certificate::parse(cert)
            .map_err(|e| rustls::Error::General(format!("libp2p certificate: {e}")))?;
        cert.verify_signature(scheme, message, signature)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadSignature))?;
        Ok(HandshakeSignatureValid::assertion())
    }

    fn schemes() -> Vec<SignatureScheme> {
        vec![
            SignatureScheme::ECDSA_NISTP384_SHA384,
            SignatureScheme::ECDSA_NISTP256_SHA256,
            SignatureScheme::ED25519,
            SignatureScheme::RSA_PSS_SHA512,
            SignatureScheme::RSA_PSS_SHA384,
            SignatureScheme::RSA_PSS_SHA256,
            SignatureScheme::RSA_PKCS1_SHA512,
            SignatureScheme::RSA_PKCS1_SHA384,
            SignatureScheme::RSA_PKCS1_SHA256,
        ]
    }
}

impl ServerCertVerifier for PeerCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The peer ID is checked against the dialled one by the swarm.
        Self::check_chain(end_entity, intermediates)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("only TLS 1.3 is offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Self::check_signature(message, cert, dss.scheme, dss.signature())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        Self::schemes()
    }
}

impl ClientCertVerifier for PeerCertVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Self::check_chain(end_entity, intermediates)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("only TLS 1.3 is offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Self::check_signature(message, cert, dss.scheme, dss.signature())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        Self::schemes()
    }
}

#[cfg(test)]
mod tests {
    use futures::AsyncWriteExt;
    use rustls::CipherSuite;

    use super::*;

    /// A stream that records the size of every write it takes, taking at
    /// most `max` bytes a call.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<usize>,
        bytes: Vec<u8>,
        flushes: usize,
        closed: bool,
        max: usize,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let n = data.len().min(self.max);
            self.writes.push(n);
            self.bytes.extend_from_slice(&data[..n]);
            Poll::Ready(Ok(n))
        }

        /// One write, however many pieces.
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            parts: &[std::io::IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            let mut n = 0;
            for p in parts {
                let take = p.len().min(self.max - n);
                self.bytes.extend_from_slice(&p[..take]);
                n += take;
            }
            self.writes.push(n);
            Poll::Ready(Ok(n))
        }

        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            self.flushes += 1;
            Poll::Ready(Ok(()))
        }

        fn poll_close(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            self.closed = true;
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn a_frames_header_and_body_leave_in_one_write_at_the_flush() {
        futures::executor::block_on(async {
            let mut s = Coalesce::new(Recorder {
                max: usize::MAX,
                ..Recorder::default()
            });
            let body: Vec<u8> = (0..16 * 1024).map(|i| i as u8).collect();
            s.write_all(&[1; 12]).await.expect("header");
            s.write_all(&body).await.expect("body");
            assert!(s.inner.writes.is_empty(), "nothing leaves before the flush");
            s.flush().await.expect("flush");
            assert_eq!(s.inner.writes, vec![12 + body.len()]);
            assert_eq!(s.inner.flushes, 1);
            assert_eq!(&s.inner.bytes[12..], &body[..]);

            // More than the buffer holds goes on at once with what is
            // held before it, in one write, in order.
            let big = vec![9; COALESCE_BYTES + 5];
            s.write_all(&[2; 3]).await.expect("small");
            s.write_all(&big).await.expect("big");
            assert_eq!(&s.inner.writes[1..], &[3 + COALESCE_BYTES + 5]);
            assert_eq!(&s.inner.bytes[12 + body.len()..][..4], &[2, 2, 2, 9]);
            s.write_all(&[3; 4]).await.expect("tail");
            s.close().await.expect("close");
            assert!(s.inner.closed);
            let total = 12 + body.len() + 3 + big.len() + 4;
            assert_eq!(s.inner.bytes.len(), total, "close writes the rest first");
            assert_eq!(&s.inner.bytes[total - 4..], &[3; 4]);
        });
    }

    /// A stream that hands out `data` and records the size of every read
    /// it is asked for.
    struct Source {
        data: Vec<u8>,
        at: usize,
        asked: Vec<usize>,
    }

    impl AsyncRead for Source {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            out: &mut [u8],
        ) -> Poll<std::io::Result<usize>> {
            self.asked.push(out.len());
            let n = out.len().min(self.data.len() - self.at);
            let at = self.at;
            out[..n].copy_from_slice(&self.data[at..at + n]);
            self.at += n;
            Poll::Ready(Ok(n))
        }
    }

    #[test]
    fn small_reads_are_served_from_one_large_socket_read() {
        use futures::AsyncReadExt;
        futures::executor::block_on(async {
            let len = 2 * READ_AHEAD_BYTES + 1000;
            let data: Vec<u8> = (0..len as u32).map(|i| (i % 253) as u8).collect();
            let mut r = ReadAhead::new(Source {
                data: data.clone(),
                at: 0,
                asked: Vec::new(),
            });
            let mut got = Vec::new();
            let mut piece = [0u8; 4096];
            loop {
                let n = r.read(&mut piece).await.expect("read");
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&piece[..n]);
            }
            assert_eq!(got, data, "every byte, in order, then the end");
            // Two whole reads, one of the last 1000 bytes, one that finds
            // the end.
            assert_eq!(r.inner.asked, vec![READ_AHEAD_BYTES; 4]);

            // A read as large as the buffer goes straight to the socket.
            let mut r = ReadAhead::new(Source {
                data: data.clone(),
                at: 0,
                asked: Vec::new(),
            });
            let mut big = vec![0u8; READ_AHEAD_BYTES + 80];
            let n = r.read(&mut big).await.expect("read");
            assert_eq!(&big[..n], &data[..n]);
            assert_eq!(r.inner.asked, vec![READ_AHEAD_BYTES + 80]);
        });
    }

    /// One direction of an in-memory connection: what was written and not
    /// yet read, and the size of every write.
    #[derive(Default)]
    struct Lane {
        bytes: std::collections::VecDeque<u8>,
        writes: Vec<usize>,
        reader: Option<std::task::Waker>,
    }

    /// One end of an in-memory connection: it writes to one lane and
    /// reads from the other.
    struct End {
        out: Arc<std::sync::Mutex<Lane>>,
        inn: Arc<std::sync::Mutex<Lane>>,
    }

    fn connection() -> (End, End, Arc<std::sync::Mutex<Lane>>) {
        let ab = Arc::new(std::sync::Mutex::new(Lane::default()));
        let ba = Arc::new(std::sync::Mutex::new(Lane::default()));
        let a = End {
            out: ab.clone(),
            inn: ba.clone(),
        };
        let b = End {
            out: ba,
            inn: ab.clone(),
        };
        (a, b, ab)
    }

    impl AsyncRead for End {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            out: &mut [u8],
        ) -> Poll<std::io::Result<usize>> {
            let mut lane = self.inn.lock().expect("lane");
            if lane.bytes.is_empty() {
                lane.reader = Some(cx.waker().clone());
                return Poll::Pending;
            }
            let n = out.len().min(lane.bytes.len());
            for (o, b) in out.iter_mut().zip(lane.bytes.drain(..n)) {
                *o = b;
            }
            Poll::Ready(Ok(n))
        }
    }

    impl AsyncWrite for End {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.poll_write_vectored(cx, &[std::io::IoSlice::new(data)])
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            parts: &[std::io::IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            let mut lane = self.out.lock().expect("lane");
            let n: usize = parts.iter().map(|p| p.len()).sum();
            for p in parts {
                lane.bytes.extend(p.iter());
            }
            lane.writes.push(n);
            if let Some(w) = lane.reader.take() {
                w.wake();
            }
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn a_cell_frame_crosses_a_tls_link_in_one_socket_write() {
        use futures::AsyncReadExt;
        futures::executor::block_on(async {
            let (a, b, a_to_b) = connection();
            let dialer = LinkSecurity::new(&Keypair::generate_ed25519(), Metrics::default())
                .expect("dialer");
            let listener_key = Keypair::generate_ed25519();
            let listener = LinkSecurity::new(&listener_key, Metrics::default()).expect("listener");
            let (dialed, accepted) = futures::join!(
                dialer.upgrade_outbound(a, TLS_PROTOCOL),
                listener.upgrade_inbound(b, TLS_PROTOCOL)
            );
            let (peer, mut a) = dialed.expect("dialer's handshake");
            let (_, mut b) = accepted.expect("listener's handshake");
            assert_eq!(peer, listener_key.public().to_peer_id());
            assert!(matches!(a, future::Either::Left(_)), "TLS, not Noise");

            // A multiplexer frame as yamux writes one: its header, then a
            // circuit's cell frame as its body.
            let body: Vec<u8> = (0..crate::circuit::wire::CELL_FRAME_BYTES as u32)
                .map(|i| (i % 251) as u8)
                .collect();
            let before = a_to_b.lock().expect("lane").writes.len();
            a.write_all(&[0x5a; 12]).await.expect("header");
            a.write_all(&body).await.expect("body");
            a.flush().await.expect("flush");
            let writes = a_to_b.lock().expect("lane").writes[before..].to_vec();
            assert_eq!(writes.len(), 1, "one write of every record: {writes:?}");
            // Its four records: the frame and each record's header, type
            // and tag, within one TCP segment at a 64 KiB MTU.
            assert_eq!(writes[0], 12 + body.len() + 4 * (5 + 1 + 16));
            assert_eq!(writes[0], tls_wire_bytes(12 + body.len()));
            assert!(writes[0] <= SEGMENT_64K_BYTES, "{} bytes", writes[0]);

            let mut got = vec![0u8; 12 + body.len()];
            b.read_exact(&mut got).await.expect("read");
            assert_eq!(&got[..12], &[0x5a; 12]);
            assert_eq!(&got[12..], &body[..]);
        });
    }

    #[test]
    fn a_short_inner_write_keeps_the_rest_in_order() {
        futures::executor::block_on(async {
            let mut s = Coalesce::new(Recorder {
                max: 1000,
                ..Recorder::default()
            });
            let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
            s.write_all(&data).await.expect("write");
            s.flush().await.expect("flush");
            assert_eq!(s.inner.bytes, data);
            assert_eq!(s.inner.writes, vec![1000; 5]);

            // A large write behind held bytes, taken 1000 bytes at a time.
            let big: Vec<u8> = (0..COALESCE_BYTES as u32 + 77)
                .map(|i| (i % 239) as u8)
                .collect();
            s.write_all(&data[..2500]).await.expect("held");
            s.write_all(&big).await.expect("big");
            s.flush().await.expect("flush");
            let mut want = data.clone();
            want.extend_from_slice(&data[..2500]);
            want.extend_from_slice(&big);
            assert_eq!(s.inner.bytes, want);
        });
    }

    #[test]
    fn aes_leads_the_offer_only_where_the_cpu_has_it() {
        let with = cipher_suites(true);
        let without = cipher_suites(false);
        assert_eq!(with[0].suite(), CipherSuite::TLS13_AES_256_GCM_SHA384);
        assert_eq!(
            without[0].suite(),
            CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
        );
        assert_eq!(with.len(), 3);
        assert_eq!(without.len(), 3);
        // AES-GCM from the cells' library on this CPU, ChaCha20-Poly1305
        // aws-lc's.
        // (TLS 1.2 suites exist only where some crate turns that feature on.)
        #[allow(unreachable_patterns)]
        let is = |a: SupportedCipherSuite, b: SupportedCipherSuite| match (a, b) {
            (SupportedCipherSuite::Tls13(a), SupportedCipherSuite::Tls13(b)) => std::ptr::eq(a, b),
            _ => false,
        };
        let aes = match aes_gcm_backend() {
            Backend::Ring => rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
            _ => rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
        };
        assert!(is(with[0], aes));
        assert!(is(without[1], aes));
        assert!(is(
            without[0],
            rustls::crypto::aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256
        ));
    }

    #[test]
    fn x25519_leads_the_key_exchanges() {
        let groups = key_exchanges();
        assert_eq!(groups[0].name(), rustls::NamedGroup::X25519);
        assert!(groups
            .iter()
            .any(|g| g.name() == rustls::NamedGroup::X25519MLKEM768));
    }

    #[test]
    fn a_certificate_names_the_identity_that_signed_it() {
        let key = Keypair::generate_ed25519();
        let (cert, _) = certificate::generate(&key).expect("certificate");
        let peer = key.public().to_peer_id();
        assert_eq!(
            presented_peer(Some(std::slice::from_ref(&cert))).expect("one good certificate"),
            peer
        );
        assert_eq!(
            PeerCertVerifier::check_chain(&cert, &[]).expect("one good certificate"),
            peer
        );
    }

    #[test]
    fn anything_but_one_good_certificate_is_refused() {
        let (a, _) = certificate::generate(&Keypair::generate_ed25519()).expect("a");
        let (b, _) = certificate::generate(&Keypair::generate_ed25519()).expect("b");
        let garbage = CertificateDer::from(vec![0x30, 0x03, 1, 2, 3]);

        assert!(PeerCertVerifier::check_chain(&garbage, &[]).is_err());
        assert!(PeerCertVerifier::check_chain(&a, std::slice::from_ref(&b)).is_err());
        assert!(presented_peer(Some(&[a.clone(), b])).is_err());
        assert!(presented_peer(Some(&[])).is_err());
        assert!(presented_peer(None).is_err());
        assert!(presented_peer(Some(&[garbage])).is_err());
        // A certificate whose bytes were altered no longer verifies.
        let mut altered = a.to_vec();
        let last = altered.len() - 1;
        altered[last] ^= 1;
        assert!(PeerCertVerifier::check_chain(&CertificateDer::from(altered), &[]).is_err());
    }

    #[test]
    fn only_the_certificate_keys_handshake_signature_is_accepted() {
        let (cert, cert_key) = certificate::generate(&Keypair::generate_ed25519()).expect("cert");
        let (other, _) = certificate::generate(&Keypair::generate_ed25519()).expect("other");
        let scheme = SignatureScheme::ECDSA_NISTP256_SHA256;
        let signer = aws_lc_rs::sign::any_ecdsa_type(&cert_key)
            .expect("signing key")
            .choose_scheme(&[scheme])
            .expect("P-256");
        let signature = signer.sign(b"transcript").expect("signature");

        assert!(
            PeerCertVerifier::check_signature(b"transcript", &cert, scheme, &signature).is_ok()
        );
        assert!(
            PeerCertVerifier::check_signature(b"transcripT", &cert, scheme, &signature).is_err()
        );
        assert!(
            PeerCertVerifier::check_signature(b"transcript", &other, scheme, &signature).is_err()
        );
        assert!(PeerCertVerifier::check_signature(b"transcript", &cert, scheme, &[7; 64]).is_err());
    }
}
