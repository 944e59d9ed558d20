//! TLS 1.3 for libp2p TCP connections, preferring AES-GCM.
//!
//! The handshake is libp2p's TLS handshake (protocol `/tls/1.0.0`): each
//! side presents a self-signed certificate whose libp2p extension carries
//! its host key, signed by that key. The certificates are made and checked
//! by `libp2p_tls::certificate`; this module only builds the rustls
//! configurations around them. It exists because `libp2p_tls::Config`
//! fixes the cipher order with ChaCha20-Poly1305 first: on CPUs with AES
//! instructions AES-GCM costs a fraction of it, and a relay forwarding to
//! another spent about a tenth of its CPU sealing and opening ChaCha20
//! (docs/benchmarks.md). Any libp2p TLS peer accepts AES-GCM (TLS 1.3
//! requires `TLS_AES_128_GCM_SHA256`), and our servers choose by their own
//! order, so a peer that prefers ChaCha20 still gets AES-GCM from us.
//!
//! Unlike `libp2p_tls`, no key log is ever written (`SSLKEYLOGFILE` is
//! ignored): session secrets stay in memory.

use futures::future::BoxFuture;
use futures::{AsyncRead, AsyncWrite, FutureExt as _};
use futures_rustls::TlsStream;
use libp2p::core::UpgradeInfo;
use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade};
use libp2p::identity::{Keypair, PeerId};
use libp2p::tls::certificate;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::aws_lc_rs::cipher_suite::{
    TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use std::sync::Arc;

/// The protocol name libp2p's TLS handshake is negotiated under.
const PROTOCOL: &str = "/tls/1.0.0";
/// The ALPN value libp2p's TLS handshake uses.
const ALPN: &[u8] = b"libp2p";

/// Why a TLS upgrade failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Our certificate could not be made.
    #[error("making the TLS certificate: {0}")]
    Certificate(#[from] certificate::GenError),
    /// The rustls configuration was refused.
    #[error("configuring TLS: {0}")]
    Config(#[from] rustls::Error),
    /// The handshake failed (I/O, or the peer's certificate was refused).
    #[error("TLS handshake: {0}")]
    Handshake(std::io::Error),
    /// The peer's certificate did not parse after the handshake.
    #[error("the peer's TLS certificate: {0}")]
    PeerCertificate(#[from] certificate::ParseError),
    /// The handshake ended without exactly one peer certificate.
    #[error("the peer presented no single TLS certificate")]
    NoCertificate,
}

/// The security upgrade (both directions), for `SwarmBuilder::with_tcp`.
#[derive(Clone)]
pub struct Config {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("tls::Config").finish_non_exhaustive()
    }
}

/// Cipher suites, fastest first where AES instructions exist.
fn provider() -> rustls::crypto::CryptoProvider {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites = vec![
        TLS13_AES_128_GCM_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS13_CHACHA20_POLY1305_SHA256,
    ];
    p
}

impl Config {
    /// Configurations presenting a fresh certificate for `key`.
    pub fn new(key: &Keypair) -> Result<Self, Error> {
        let (cert, private) = certificate::generate(key)?;
        let provider = Arc::new(provider());
        // Presented as is: rustls's own certificate checks (webpki) refuse
        // the critical libp2p extension.
        let ours = Arc::new(Ours(Arc::new(rustls::sign::CertifiedKey::new(
            vec![cert],
            provider.key_provider.load_private_key(private)?,
        ))));
        let verifier = Arc::new(PeerCertificate);
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier.clone())
            .with_cert_resolver(ours.clone());
        server.alpn_protocols = vec![ALPN.to_vec()];
        server.ignore_client_order = true;
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(ours);
        client.alpn_protocols = vec![ALPN.to_vec()];
        // libp2p's handshake sends no server name.
        client.enable_sni = false;
        Ok(Self {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

/// Our certificate, whatever the peer hints.
#[derive(Debug)]
struct Ours(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for Ours {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl rustls::client::ResolvesClientCert for Ours {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _schemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A secured connection. Writes are gathered until the multiplexer
/// flushes: yamux writes each frame as a 12-byte header and then its body,
/// and `futures_rustls` seals and sends every write as its own TLS record
/// with its own `writev`. Gathered, a frame is one record (or a few, of
/// 16 KiB) and one system call, which halves the syscalls of a busy
/// federation link and the records its peer opens (docs/benchmarks.md).
pub type Stream<C> = futures::io::BufWriter<TlsStream<C>>;

/// Bytes gathered before they are written (a yamux frame of up to 16 KiB
/// and its header fit twice).
const WRITE_BUFFER: usize = 32 * 1024;

fn buffered<C: AsyncRead + AsyncWrite + Unpin>(s: TlsStream<C>) -> Stream<C> {
    futures::io::BufWriter::with_capacity(WRITE_BUFFER, s)
}

impl UpgradeInfo for Config {
    type Info = &'static str;
    type InfoIter = std::iter::Once<Self::Info>;

    fn protocol_info(&self) -> Self::InfoIter {
        std::iter::once(PROTOCOL)
    }
}

/// The PeerId in the single certificate the peer presented.
fn peer_of(state: &rustls::CommonState) -> Result<PeerId, Error> {
    match state.peer_certificates() {
        Some([cert]) => Ok(certificate::parse(cert)?.peer_id()),
        _ => Err(Error::NoCertificate),
    }
}

impl<C> InboundConnectionUpgrade<C> for Config
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = (PeerId, Stream<C>);
    type Error = Error;
    type Future = BoxFuture<'static, Result<Self::Output, Self::Error>>;

    fn upgrade_inbound(self, socket: C, _: Self::Info) -> Self::Future {
        async move {
            let stream = futures_rustls::TlsAcceptor::from(self.server)
                .accept(socket)
                .await
                .map_err(Error::Handshake)?;
            let peer = peer_of(stream.get_ref().1)?;
            Ok((peer, buffered(stream.into())))
        }
        .boxed()
    }
}

impl<C> OutboundConnectionUpgrade<C> for Config
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = (PeerId, Stream<C>);
    type Error = Error;
    type Future = BoxFuture<'static, Result<Self::Output, Self::Error>>;

    fn upgrade_outbound(self, socket: C, _: Self::Info) -> Self::Future {
        async move {
            // Any name will do: SNI is off, and the certificate is checked
            // by its libp2p extension, not by name. (The Swarm compares the
            // PeerId with the one dialled.)
            let name = ServerName::IpAddress(std::net::Ipv4Addr::UNSPECIFIED.into());
            let stream = futures_rustls::TlsConnector::from(self.client)
                .connect(name, socket)
                .await
                .map_err(Error::Handshake)?;
            let peer = peer_of(stream.get_ref().1)?;
            Ok((peer, buffered(stream.into())))
        }
        .boxed()
    }
}

/// Only TLS 1.3 is configured, so this is never asked.
fn tls12_refused() -> rustls::Error {
    rustls::Error::General("libp2p's TLS handshake is TLS 1.3 only".into())
}

/// Accepts exactly one certificate that carries a valid libp2p extension,
/// and handshake signatures made with that certificate's key.
#[derive(Debug)]
struct PeerCertificate;

impl PeerCertificate {
    fn check(
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<(), rustls::Error> {
        if !intermediates.is_empty() {
            return Err(rustls::Error::General(
                "a libp2p peer presents exactly one certificate".into(),
            ));
        }
        certificate::parse(end_entity)?;
        Ok(())
    }

    fn signature(
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        certificate::parse(cert)?.verify_signature(dss.scheme, message, dss.signature())?;
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

impl ServerCertVerifier for PeerCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Self::check(end_entity, intermediates)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Self::signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        Self::schemes()
    }
}

impl ClientCertVerifier for PeerCertificate {
    fn offer_client_auth(&self) -> bool {
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
        Self::check(end_entity, intermediates)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Self::signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        Self::schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_util::compat::{Compat, TokioAsyncReadCompatExt as _};

    async fn pipe() -> (Compat<tokio::net::TcpStream>, Compat<tokio::net::TcpStream>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let (a, b) = tokio::join!(tokio::net::TcpStream::connect(addr), l.accept());
        (a.expect("connect").compat(), b.expect("accept").0.compat())
    }

    fn suite<C>(s: &TlsStream<C>) -> rustls::CipherSuite {
        let state: &rustls::CommonState = match s {
            TlsStream::Client(c) => c.get_ref().1,
            TlsStream::Server(c) => c.get_ref().1,
        };
        state.negotiated_cipher_suite().expect("negotiated").suite()
    }

    #[tokio::test]
    async fn two_ends_learn_each_others_peer_id_over_aes_gcm() {
        let (ka, kb) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let (a, b) = pipe().await;
        let (out, inb) = tokio::join!(
            Config::new(&ka)
                .expect("config")
                .upgrade_outbound(a, PROTOCOL),
            Config::new(&kb)
                .expect("config")
                .upgrade_inbound(b, PROTOCOL),
        );
        let ((pa, sa), (pb, sb)) = (out.expect("client"), inb.expect("server"));
        assert_eq!(pa, kb.public().to_peer_id());
        assert_eq!(pb, ka.public().to_peer_id());
        assert_eq!(
            suite(sa.get_ref()),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
        assert_eq!(
            suite(sb.get_ref()),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
    }

    /// libp2p's own TLS (ChaCha20 first) still interoperates, both ways,
    /// and our server picks AES-GCM even when the client prefers ChaCha20.
    #[tokio::test]
    async fn libp2p_tls_peers_connect_both_ways() {
        let (ka, kb) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let (a, b) = pipe().await;
        let (out, inb) = tokio::join!(
            libp2p::tls::Config::new(&ka)
                .expect("config")
                .upgrade_outbound(a, PROTOCOL),
            Config::new(&kb)
                .expect("config")
                .upgrade_inbound(b, PROTOCOL),
        );
        let ((pa, _), (pb, sb)) = (out.expect("client"), inb.expect("server"));
        assert_eq!(
            (pa, pb),
            (kb.public().to_peer_id(), ka.public().to_peer_id())
        );
        assert_eq!(
            suite(sb.get_ref()),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );

        let (a, b) = pipe().await;
        let (out, inb) = tokio::join!(
            Config::new(&ka)
                .expect("config")
                .upgrade_outbound(a, PROTOCOL),
            libp2p::tls::Config::new(&kb)
                .expect("config")
                .upgrade_inbound(b, PROTOCOL),
        );
        let ((pa, sa), (pb, _)) = (out.expect("client"), inb.expect("server"));
        assert_eq!(
            (pa, pb),
            (kb.public().to_peer_id(), ka.public().to_peer_id())
        );
        assert_eq!(
            suite(sa.get_ref()),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
    }

    /// A socket that counts the writes reaching it.
    struct Counting<S> {
        inner: S,
        writes: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl<S: AsyncRead + Unpin> AsyncRead for Counting<S> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut [u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl<S: AsyncWrite + Unpin> AsyncWrite for Counting<S> {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.writes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
        }
        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.writes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
        }
        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_close(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_close(cx)
        }
    }

    /// A multiplexer frame written as header and body, then flushed,
    /// reaches the socket as one write, and arrives whole.
    #[tokio::test]
    async fn writes_are_gathered_until_flushed() {
        use futures::{AsyncReadExt as _, AsyncWriteExt as _};
        let (ka, kb) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let (a, b) = pipe().await;
        let writes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let a = Counting {
            inner: a,
            writes: writes.clone(),
        };
        let (out, inb) = tokio::join!(
            Config::new(&ka)
                .expect("config")
                .upgrade_outbound(a, PROTOCOL),
            Config::new(&kb)
                .expect("config")
                .upgrade_inbound(b, PROTOCOL),
        );
        let ((_, mut sa), (_, mut sb)) = (out.expect("client"), inb.expect("server"));
        let body = vec![7u8; 4000];
        let before = writes.load(std::sync::atomic::Ordering::Relaxed);
        sa.write_all(&[1; 12]).await.expect("header");
        sa.write_all(&body).await.expect("body");
        assert_eq!(
            writes.load(std::sync::atomic::Ordering::Relaxed),
            before,
            "nothing is written before the flush"
        );
        sa.flush().await.expect("flush");
        assert_eq!(
            writes.load(std::sync::atomic::Ordering::Relaxed),
            before + 1
        );
        let mut got = vec![0u8; 12 + body.len()];
        sb.read_exact(&mut got).await.expect("read");
        assert_eq!(&got[..12], &[1; 12]);
        assert_eq!(&got[12..], &body[..]);
    }

    /// A peer that presents no libp2p certificate gets no connection.
    #[tokio::test]
    async fn a_plain_tls_client_is_refused() {
        let kb = Keypair::generate_ed25519();
        let (a, b) = pipe().await;
        // A client certificate without the libp2p extension.
        let plain = unmarked_cert();
        let p = Arc::new(provider());
        let ours = Ours(Arc::new(rustls::sign::CertifiedKey::new(
            vec![plain.0],
            p.key_provider.load_private_key(plain.1).expect("key"),
        )));
        let mut client = rustls::ClientConfig::builder_with_provider(p)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PeerCertificate))
            .with_client_cert_resolver(Arc::new(ours));
        client.alpn_protocols = vec![ALPN.to_vec()];
        let name = ServerName::IpAddress(std::net::Ipv4Addr::UNSPECIFIED.into());
        let (out, inb) = tokio::join!(
            futures_rustls::TlsConnector::from(Arc::new(client)).connect(name, a),
            Config::new(&kb)
                .expect("config")
                .upgrade_inbound(b, PROTOCOL),
        );
        assert!(
            inb.is_err(),
            "accepted a certificate with no libp2p extension"
        );
        drop(out);
    }

    /// A certificate without a (recognisable) libp2p extension: libp2p's
    /// certificate for a fresh key with the extension's OID altered.
    fn unmarked_cert() -> (
        CertificateDer<'static>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ) {
        let (cert, key) = certificate::generate(&Keypair::generate_ed25519()).expect("cert");
        let mut der = cert.as_ref().to_vec();
        // The libp2p extension OID 1.3.6.1.4.1.53594.1.1 as DER.
        let oid = [0x2b, 0x06, 0x01, 0x04, 0x01, 0x83, 0xa2, 0x5a, 0x01, 0x01];
        let at = der
            .windows(oid.len())
            .position(|w| w == oid)
            .expect("extension present");
        der[at + oid.len() - 1] ^= 0x7f;
        (CertificateDer::from(der), key)
    }
}
