//! HTTPS upstreams: the gateway verifies the upstream's certificate, against Mozilla's roots
//! and a provider's own `ca_file`, and a call over TLS is proxied and charged like any other.
//!
//! The upstream is the mock behind a TLS terminator of the test's own (rustls, real sockets),
//! with a certificate for 127.0.0.1 from a test CA in `tests/fixtures/tls/` (made with
//! `openssl req` / `openssl x509 -req`, P-256, valid for 100 years).

use crate::common::*;
use serde_json::json;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tollgate::config::{ModelConfig, ProviderConfig};
use tollgate::mock::MockOptions;
use tollgate_actors::money::NANOS_PER_USDT;
use tollgate_actors::Amount;

pub(crate) fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
}

/// Terminates TLS on a loopback port and passes the bytes to `upstream`.
pub(crate) struct TlsFront {
    pub(crate) addr: std::net::SocketAddr,
    /// Handshakes that completed.
    pub(crate) handshakes: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsFront {
    pub(crate) async fn start(upstream: std::net::SocketAddr) -> TlsFront {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_file_iter(fixture("server.pem"))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(fixture("server.key")).unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handshakes = Arc::new(AtomicU64::new(0));
        let counted = handshakes.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let counted = counted.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    counted.fetch_add(1, Ordering::SeqCst);
                    let Ok(mut plain) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        TlsFront {
            addr,
            handshakes,
            task,
        }
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(crate) fn https_provider(
    name: &str,
    front: std::net::SocketAddr,
    ca_file: Option<PathBuf>,
) -> ProviderConfig {
    ProviderConfig {
        name: name.to_owned(),
        kind: "openai-compatible".to_owned(),
        base_url: format!("https://{front}/v1"),
        max_concurrency: 16,
        connect_timeout_ms: 2_000,
        ca_file,
        proxy: Some("direct".to_owned()),
        request_timeout_ms: 3_000,
        stream_idle_timeout_ms: 3_000,
        // One attempt a call: these tests count what reaches the upstream or a proxy.
        retries: 0,
        ..Default::default()
    }
}

pub(crate) fn model(id: &str, provider: &str) -> ModelConfig {
    ModelConfig {
        id: id.to_owned(),
        provider: provider.to_owned(),
        upstream_model: "gpt-4o-mini".to_owned(),
        input_per_mtok: "0.15".to_owned(),
        output_per_mtok: "0.60".to_owned(),
        max_output_tokens: 100,
        ..Default::default()
    }
}

#[tokio::test]
async fn an_https_upstream_is_verified_then_proxied_and_charged() {
    let upstream = Mock::start(MockOptions::default()).await;
    let front = TlsFront::start(upstream.addr).await;
    let Some(h) = Harness::start_with(Backend::Sqlite, MockOptions::default(), |c| {
        c.providers.push(https_provider(
            "private-ca",
            front.addr,
            Some(fixture("ca.pem")),
        ));
        c.providers
            .push(https_provider("stranger", front.addr, None));
        c.models.push(model("over-tls", "private-ca"));
        c.models.push(model("untrusted", "stranger"));
        c.models.push(ModelConfig {
            upstream_model: "mock-linger".to_owned(),
            ..model("lingers", "private-ca")
        });
    })
    .await
    else {
        return;
    };
    let (account, key) = h.funded("1").await;
    let messages = json!([{"role": "user", "content": "hello over tls"}]);

    // Not vouched for by Mozilla's roots: no call, no charge.
    let resp = h
        .chat(&key, &json!({"model": "untrusted", "messages": messages}))
        .await;
    assert_eq!(resp.status(), 502);
    assert_error_shape(&resp.json().await.unwrap(), "upstream_error");
    assert_eq!(front.handshakes.load(Ordering::SeqCst), 0);
    assert_eq!(h.balance(&account).await, Amount(NANOS_PER_USDT));

    // Signed by the provider's own CA: whole answers and streams, one after another, all on
    // the one pooled connection (a handshake per call would be a pool that does not pool).
    for _ in 0..2 {
        let resp = h
            .chat(&key, &json!({"model": "over-tls", "messages": messages}))
            .await;
        assert_eq!(resp.status(), 200);
        let body: serde_json::Value = resp.json().await.unwrap();
        assert!(body["choices"][0]["message"]["content"]
            .as_str()
            .is_some_and(|s| !s.is_empty()));
        let stream = json!({"model": "over-tls", "stream": true, "messages": messages});
        let resp = h.chat(&key, &stream).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(
            sse_events(resp).await.last().map(String::as_str),
            Some("[DONE]")
        );
    }
    // A stream whose body ends a while after its [DONE]: the gateway reads on to the end, so
    // the connection still goes back to the pool.
    for _ in 0..2 {
        let stream = json!({"model": "lingers", "stream": true, "messages": messages});
        let resp = h.chat(&key, &stream).await;
        assert_eq!(
            sse_events(resp).await.last().map(String::as_str),
            Some("[DONE]")
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert_eq!(front.handshakes.load(Ordering::SeqCst), 1);

    h.flush().await;
    let usage = h.usage(&account).await;
    let ok: Vec<_> = usage.iter().filter(|u| u["status"] == 200).collect();
    assert_eq!(ok.len(), 6, "{usage:?}");
    assert!(ok
        .iter()
        .all(|u| u["model"] == "over-tls" || u["model"] == "lingers"));
    let charged = Amount(billed(&usage));
    assert!(charged.nanos() > 0);
    assert_eq!(
        h.balance(&account).await,
        Amount(NANOS_PER_USDT - charged.nanos())
    );
    h.stop().await;
}

#[tokio::test]
async fn a_bad_base_url_or_ca_file_stops_the_gateway_from_starting() {
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("ca.pem");
    std::fs::write(&not_pem, "not a certificate\n").unwrap();
    let mut config = tollgate::config::Config::from_toml(&config_toml(
        "sqlite::memory:",
        dir.path(),
        "127.0.0.1:9".parse().unwrap(),
    ))
    .unwrap();
    config.providers.push(https_provider(
        "bad-ca",
        "127.0.0.1:9".parse().unwrap(),
        Some(not_pem.clone()),
    ));
    let err = config.catalog().unwrap_err().to_string();
    assert!(err.contains("bad-ca") && err.contains("ca_file"), "{err}");
    config.providers.last_mut().unwrap().ca_file = Some(dir.path().join("missing.pem"));
    let err = config.catalog().unwrap_err().to_string();
    assert!(err.contains("missing.pem"), "{err}");
    config.providers.last_mut().unwrap().ca_file = None;
    config.catalog().unwrap();
    for url in [
        "api.example.com/v1",
        "ftp://api.example.com/v1",
        "https:///v1",
        "not a url",
    ] {
        config.providers.last_mut().unwrap().base_url = url.to_owned();
        let err = config.catalog().unwrap_err().to_string();
        assert!(
            err.contains("bad-ca") && err.contains("base_url"),
            "{url}: {err}"
        );
    }
}
