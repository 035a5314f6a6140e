//! Upstreams behind an HTTP proxy: a provider's `proxy` setting, or else the environment's
//! `HTTP_PROXY` / `HTTPS_PROXY` / `NO_PROXY`, sends its connections through a CONNECT tunnel,
//! and TLS to the upstream runs inside the tunnel, end to end.
//!
//! The proxy is the test's own, on real sockets: it reads a CONNECT request, records it,
//! checks the credentials it demands (if any) and splices the two connections.

use crate::common::*;
use crate::tls::{fixture, https_provider, model, TlsFront};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tollgate::config::{Config, ProviderConfig};
use tollgate::mock::MockOptions;

/// `user:s3cret`, as a `Proxy-Authorization` header carries it.
const CREDENTIALS: &str = "Basic dXNlcjpzM2NyZXQ=";

/// One CONNECT request as the proxy saw it.
#[derive(Clone, Debug, PartialEq)]
struct Tunnel {
    target: String,
    authorization: Option<String>,
}

struct ConnectProxy {
    addr: std::net::SocketAddr,
    tunnels: Arc<Mutex<Vec<Tunnel>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ConnectProxy {
    /// A proxy that answers 407 to a request without `demand` as its credentials, if given.
    async fn start(demand: Option<&'static str>) -> ConnectProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tunnels = Arc::new(Mutex::new(Vec::new()));
        let seen = tunnels.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(serve_tunnel(client, demand, seen.clone()));
            }
        });
        ConnectProxy {
            addr,
            tunnels,
            task,
        }
    }

    fn tunnels(&self) -> Vec<Tunnel> {
        self.tunnels.lock().unwrap().clone()
    }
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_tunnel(
    mut client: TcpStream,
    demand: Option<&'static str>,
    seen: Arc<Mutex<Vec<Tunnel>>>,
) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let end = loop {
        let Ok(n) = client.read(&mut buf).await else {
            return;
        };
        if n == 0 || head.len() > 16 * 1024 {
            return;
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let text = String::from_utf8_lossy(&head[..end]).into_owned();
    let mut lines = text.split("\r\n");
    let request = lines.next().unwrap_or_default();
    let mut parts = request.split(' ');
    let (method, target) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let authorization = lines.find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("proxy-authorization")
            .then(|| value.trim().to_owned())
    });
    seen.lock().unwrap().push(Tunnel {
        target: target.to_owned(),
        authorization: authorization.clone(),
    });
    let refuse = |status: &str| format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
    if method != "CONNECT" {
        let _ = client
            .write_all(refuse("405 Method Not Allowed").as_bytes())
            .await;
        return;
    }
    if demand.is_some() && authorization.as_deref() != demand {
        let answer = "HTTP/1.1 407 Proxy Authentication Required\r\n\
                      proxy-authenticate: Basic realm=\"test\"\r\ncontent-length: 0\r\n\r\n";
        let _ = client.write_all(answer.as_bytes()).await;
        return;
    }
    let Ok(mut upstream) = TcpStream::connect(target).await else {
        let _ = client.write_all(refuse("502 Bad Gateway").as_bytes()).await;
        return;
    };
    if client
        .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        .await
        .is_err()
    {
        return;
    }
    // Whatever the client sent after its CONNECT request goes on first.
    if upstream.write_all(&head[end..]).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

/// A provider at a plain-HTTP upstream, through `proxy` (`Some("direct")`: none).
pub(crate) fn plain_provider(
    name: &str,
    upstream: std::net::SocketAddr,
    proxy: Option<String>,
) -> ProviderConfig {
    ProviderConfig {
        base_url: format!("http://{upstream}/v1"),
        proxy,
        ca_file: None,
        ..https_provider(name, upstream, None)
    }
}

#[tokio::test]
async fn a_providers_proxy_carries_its_calls_plain_and_over_tls() {
    let upstream = Mock::start(MockOptions::default()).await;
    let front = TlsFront::start(upstream.addr).await;
    let proxy = ConnectProxy::start(Some(CREDENTIALS)).await;
    let via = format!("http://user:s3cret@{}", proxy.addr);
    let Some(h) = Harness::start_with(Backend::Sqlite, MockOptions::default(), |c| {
        c.providers
            .push(plain_provider("proxied", upstream.addr, Some(via.clone())));
        c.providers.push(ProviderConfig {
            proxy: Some(via.clone()),
            ..https_provider("proxied-tls", front.addr, Some(fixture("ca.pem")))
        });
        c.models.push(model("through-proxy", "proxied"));
        c.models.push(model("through-proxy-tls", "proxied-tls"));
    })
    .await
    else {
        return;
    };
    let (account, key) = h.funded("1").await;
    let messages = json!([{"role": "user", "content": "hello through a proxy"}]);
    for m in ["through-proxy", "through-proxy-tls"] {
        let resp = h
            .chat(&key, &json!({"model": m, "messages": messages}))
            .await;
        assert_eq!(resp.status(), 200, "{m}");
        let v: Value = resp.json().await.unwrap();
        assert!(v["usage"]["total_tokens"].as_u64().unwrap() > 0, "{v}");
    }
    let resp = h
        .chat(
            &key,
            &json!({"model": "through-proxy-tls", "messages": messages, "stream": true}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        sse_events(resp).await.last().map(String::as_str),
        Some("[DONE]")
    );
    // The harness's own provider says `proxy = "direct"`.
    let resp = h
        .chat(&key, &json!({"model": "gpt-4o-mini", "messages": messages}))
        .await;
    assert_eq!(resp.status(), 200);

    // One tunnel per provider (pooled connections are reused), each with the credentials
    // from the proxy URL, each to its upstream; TLS went through the tunnel to the front.
    let mut tunnels = proxy.tunnels();
    tunnels.sort_by(|a, b| a.target.cmp(&b.target));
    let mut expected = vec![
        Tunnel {
            target: upstream.addr.to_string(),
            authorization: Some(CREDENTIALS.to_owned()),
        },
        Tunnel {
            target: front.addr.to_string(),
            authorization: Some(CREDENTIALS.to_owned()),
        },
    ];
    expected.sort_by(|a, b| a.target.cmp(&b.target));
    assert_eq!(tunnels, expected);
    assert!(front.handshakes.load(std::sync::atomic::Ordering::SeqCst) >= 1);

    h.flush().await;
    let usage = h.usage(&account).await;
    assert_eq!(usage.len(), 4);
    assert!(usage.iter().all(|u| u["status"] == 200), "{usage:?}");
    h.stop().await;
}

#[tokio::test]
async fn a_proxy_that_refuses_the_tunnel_leaves_the_call_unreachable_and_free() {
    let upstream = Mock::start(MockOptions::default()).await;
    let proxy = ConnectProxy::start(Some(CREDENTIALS)).await;
    let wrong = format!("http://user:wrong@{}", proxy.addr);
    let Some(h) = Harness::start_with(Backend::Sqlite, MockOptions::default(), |c| {
        c.providers.push(plain_provider(
            "refused",
            upstream.addr,
            Some(wrong.clone()),
        ));
        c.models.push(model("behind-refusal", "refused"));
    })
    .await
    else {
        return;
    };
    let (account, key) = h.funded("1").await;
    let resp = h
        .chat(
            &key,
            &json!({"model": "behind-refusal", "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
    assert_eq!(resp.status(), 502);
    assert_error_shape(&resp.json().await.unwrap(), "upstream_error");
    assert_eq!(proxy.tunnels().len(), 1);
    assert_eq!(h.balance(&account).await.to_string(), "1");
    let view = h.account_view(&account).await;
    assert_eq!(view["reserved"], "0", "{view}");
    let usage = h.usage_once_settled(&account).await;
    assert_eq!(usage.len(), 1);
    assert_eq!(usage[0]["status"], 502);
    assert_eq!(usage[0]["cost"], "0");
    h.stop().await;
}

/// A proxy is asked for the port the upstream's scheme implies when its URL names none (the
/// CONNECT request must carry one; 443 would be wrong for http://).
#[tokio::test]
async fn an_upstream_on_its_default_port_is_tunnelled_to_that_port() {
    let proxy = ConnectProxy::start(None).await;
    let via = format!("http://{}", proxy.addr);
    let Some(h) = Harness::start_with(Backend::Sqlite, MockOptions::default(), |c| {
        c.providers.push(ProviderConfig {
            base_url: "http://upstream.invalid/v1".to_owned(),
            proxy: Some(via.clone()),
            ..https_provider("plain-default-port", proxy.addr, None)
        });
        c.providers.push(ProviderConfig {
            base_url: "https://upstream.invalid/v1".to_owned(),
            proxy: Some(via.clone()),
            ..https_provider("tls-default-port", proxy.addr, None)
        });
        c.models.push(model("plain-80", "plain-default-port"));
        c.models.push(model("tls-443", "tls-default-port"));
    })
    .await
    else {
        return;
    };
    let (_, key) = h.funded("1").await;
    for m in ["plain-80", "tls-443"] {
        let resp = h
            .chat(
                &key,
                &json!({"model": m, "messages": [{"role": "user", "content": "x"}]}),
            )
            .await;
        // The proxy cannot reach a host in .invalid: 502 from it, 502 from the gateway.
        assert_eq!(resp.status(), 502, "{m}");
    }
    let targets: Vec<String> = proxy.tunnels().into_iter().map(|t| t.target).collect();
    assert_eq!(targets, ["upstream.invalid:80", "upstream.invalid:443"]);
    h.stop().await;
}

/// The real binary with `HTTP_PROXY` (and `NO_PROXY`) in its environment: a provider without
/// a `proxy` setting goes through it, one with `proxy = "direct"` (the test config's own
/// `mock`) does not, and a host in `NO_PROXY` is reached directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_environment_names_the_proxy_unless_the_provider_says_direct() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    let mock = Mock::start(MockOptions::default()).await;
    let proxy = ConnectProxy::start(None).await;
    let config = db.dir.path().join("tollgate.toml");
    let mut toml = config_toml(&db.url, db.dir.path(), mock.addr);
    // `env` has no proxy setting: the environment decides for it. `localhost` below is in
    // NO_PROXY; 127.0.0.1 is not.
    let port = mock.addr.port();
    toml.push_str(&format!(
        r#"
[[providers]]
name = "env"
base_url = "http://127.0.0.1:{port}/v1"

[[providers]]
name = "exempt"
base_url = "http://localhost:{port}/v1"

[[models]]
id = "m-env"
provider = "env"
upstream_model = "gpt-4o-mini"
input_per_mtok = "1"
output_per_mtok = "1"

[[models]]
id = "m-exempt"
provider = "exempt"
upstream_model = "gpt-4o-mini"
input_per_mtok = "1"
output_per_mtok = "1"
"#
    ));
    std::fs::write(&config, toml).unwrap();
    let log = db.dir.path().join("tollgate.log");
    let proxy_url = format!("http://{}", proxy.addr);
    let server = Server::spawn_with_env(
        &config,
        free_port(),
        &log,
        "info",
        &[("HTTP_PROXY", &proxy_url), ("NO_PROXY", "localhost")],
    )
    .await;
    let http = reqwest::Client::new();
    let (_, key) = seed_account(&http, &server.base, "env-proxy@example.com", "1").await;
    let call = |model: &'static str| {
        http.post(format!("{}/v1/chat/completions", server.base))
            .bearer_auth(&key)
            .json(&json!({"model": model, "messages": [{"role": "user", "content": "x"}]}))
            .send()
    };
    assert_eq!(call("gpt-4o-mini").await.unwrap().status(), 200);
    assert_eq!(call("m-exempt").await.unwrap().status(), 200);
    assert!(proxy.tunnels().is_empty(), "{:?}", proxy.tunnels());
    assert_eq!(call("m-env").await.unwrap().status(), 200);
    assert_eq!(
        proxy.tunnels(),
        vec![Tunnel {
            target: mock.addr.to_string(),
            authorization: None,
        }]
    );
    server.terminate().await;
    db.drop_db().await;
}

#[test]
fn a_proxy_setting_is_checked_at_start_without_repeating_its_password() {
    let config = |proxy: &str| {
        Config::from_toml(&format!(
            r#"
admin_token = "t"

[[providers]]
name = "p"
base_url = "https://api.example.com/v1"
proxy = "{proxy}"
"#
        ))
        .unwrap()
    };
    for (proxy, says) in [
        ("socks5://user:hunter2@127.0.0.1:1080", "socks5"),
        ("https://user:hunter2@proxy.example.com:443", "https"),
        ("http://user:hunter2@", "not a proxy URL"),
        ("ftp://user:hunter2@proxy.example.com", "not a proxy URL"),
    ] {
        let err = config(proxy).catalog().unwrap_err().to_string();
        assert!(err.contains("provider `p`"), "{proxy}: {err}");
        assert!(err.contains(says), "{proxy}: {err}");
        assert!(!err.contains("hunter2"), "{proxy}: {err}");
    }
    for proxy in [
        "direct",
        "http://user:pass@proxy.example.com:3128",
        "proxy.example.com:3128",
    ] {
        let c = config(proxy);
        assert!(c.catalog().is_ok(), "{proxy}");
        let specs = c.provider_specs().unwrap();
        let resolved = specs[0].proxy.as_ref().map(|p| p.uri.to_string());
        match proxy {
            "direct" => assert_eq!(resolved, None),
            _ => assert_eq!(resolved.as_deref(), Some("http://proxy.example.com:3128/")),
        }
    }
}
