//! The HTTP proxy on one VM's egress listener: `CONNECT host:port`
//! becomes a tunnel to a checked address; an absolute-form request
//! (`GET http://host/path`) is sent on to one. TLS inside a tunnel is the
//! guest's and the upstream's alone, unless the VM holds a secret bound
//! to that host: then the connection is intercepted (`intercept`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixListener};
use tokio_util::sync::CancellationToken;

use super::{Gate, Outcome, Record, Settings, addresses};

pub(super) type Body = BoxBody<Bytes, hyper::Error>;

/// Headers that belong to one hop and are not passed on.
pub(super) const HOP_HEADERS: [&str; 9] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

pub(super) struct Vm {
    pub(super) name: String,
    pub(super) gate: Arc<dyn Gate>,
    pub(super) settings: Settings,
    /// Cancelled when the VM's proxy stops: every connection and tunnel
    /// of the VM ends with it.
    pub(super) stop: CancellationToken,
}

/// A connection's place among the VM's bounded ones; a tunnel holds it
/// as long as it lasts.
pub(super) type Slot = Arc<tokio::sync::OwnedSemaphorePermit>;

/// Serves VM `vm`'s egress listener until `stop` is cancelled (the VM
/// stopped) or the listener fails; every connection and tunnel it
/// started ends with it.
pub async fn serve(
    listener: UnixListener,
    vm: String,
    gate: Arc<dyn Gate>,
    settings: Settings,
    stop: CancellationToken,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(settings.max_connections));
    let vm = Arc::new(Vm {
        name: vm,
        gate,
        settings,
        stop,
    });
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = vm.stop.cancelled() => return,
        };
        let Ok((stream, _)) = accepted else {
            return;
        };
        // One VM's connections (tunnels included) are bounded; past
        // that, new ones wait.
        let slot: Slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => Arc::new(slot),
                Err(_) => return,
            },
            _ = vm.stop.cancelled() => return,
        };
        let vm = vm.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn({
                let vm = vm.clone();
                move |req| handle(vm.clone(), slot.clone(), req)
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(vm.settings.header_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::select! {
                _ = conn => {}
                _ = vm.stop.cancelled() => {}
            }
        });
    }
}

/// Where a request goes: (method as said, host, port).
fn target(req: &Request<Incoming>) -> Result<(String, u16), String> {
    let uri = req.uri();
    if req.method() == Method::CONNECT {
        let authority = uri.authority().ok_or("CONNECT needs host:port")?;
        let port = authority.port_u16().ok_or("CONNECT needs host:port")?;
        return Ok((normal(authority.host()), port));
    }
    match (uri.scheme_str(), uri.host()) {
        (Some("http"), Some(host)) => Ok((normal(host), uri.port_u16().unwrap_or(80))),
        (Some(other), Some(_)) => Err(format!(
            "{other}:// requests go through CONNECT (HTTPS_PROXY), not as absolute-form"
        )),
        _ => Err("this is nexusd's egress proxy: send CONNECT host:port or an absolute-form http:// request".into()),
    }
}

/// A host as it is decided on and looked up: lowercase, no brackets, no
/// trailing dot (`Example.COM.` is `example.com`).
fn normal(host: &str) -> String {
    host.trim_matches(['[', ']'])
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

async fn handle(
    vm: Arc<Vm>,
    slot: Slot,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let method = req.method().to_string();
    let (host, port) = match target(&req) {
        Ok(target) => target,
        Err(why) => return Ok(text(StatusCode::BAD_REQUEST, &why)),
    };
    let mut record = Record {
        vm: vm.name.clone(),
        identity: String::new(),
        method,
        host: host.clone(),
        port,
        outcome: Outcome::Ok,
        bytes_up: 0,
        bytes_down: 0,
        took: Default::default(),
        intercepted: false,
        requests: 0,
        secrets: Vec::new(),
        status: None,
    };
    let refuse = |mut record: Record, status: StatusCode, why: String| {
        record.outcome = if status == StatusCode::FORBIDDEN {
            Outcome::Denied(why.clone())
        } else {
            Outcome::Failed(why.clone())
        };
        record.took = started.elapsed();
        vm.gate.record(record);
        Ok(text(status, &format!("nexus egress: {why}")))
    };
    let rules = match vm.gate.rules(&vm.name) {
        Ok(rules) => rules,
        Err(why) => return refuse(record, StatusCode::FORBIDDEN, why),
    };
    record.identity = rules.identity.clone();
    // What the proxy reads of the request itself (a CONNECT's head, a
    // plain request) must carry no placeholder: nothing replaces it there.
    if let Err(why) =
        rules
            .granted
            .refuse_unplaced(&host, port, &req.uri().to_string(), req.headers(), false)
    {
        return refuse(record, StatusCode::FORBIDDEN, why);
    }
    let intercept = req.method() == Method::CONNECT && rules.granted.intercepts(&host, port);
    let upstream = match open(&vm, &rules, &host, port).await {
        Ok(stream) => stream,
        Err((status, why)) => return refuse(record, status, why),
    };
    if intercept {
        let (up, down) = (Arc::default(), Arc::default());
        let counted = Counted::with(upstream, &up, &down);
        let tls = match super::intercept::connect_tls(&vm, &host, port, counted).await {
            Ok(tls) => tls,
            Err(why) => return refuse(record, StatusCode::BAD_GATEWAY, why),
        };
        record.intercepted = true;
        tokio::spawn(super::intercept::serve(
            vm.clone(),
            slot,
            req,
            tls,
            record,
            (up, down),
            started,
        ));
        return Ok(Response::new(empty()));
    }
    let counted = Counted::new(upstream);
    let (up, down) = (counted.up.clone(), counted.down.clone());
    let finish = move |mut record: Record, outcome: Result<(), String>, gate: &Arc<dyn Gate>| {
        record.outcome = match outcome {
            Ok(()) => Outcome::Ok,
            Err(why) => Outcome::Failed(why),
        };
        record.bytes_up = up.load(Ordering::Relaxed);
        record.bytes_down = down.load(Ordering::Relaxed);
        record.took = started.elapsed();
        gate.record(record);
    };
    if req.method() == Method::CONNECT {
        let gate = vm.gate.clone();
        let stop = vm.stop.clone();
        tokio::spawn(async move {
            // The tunnel keeps the connection's slot while it lasts.
            let _slot = slot;
            let tunnel = async {
                match hyper::upgrade::on(req).await {
                    Ok(upgraded) => {
                        let mut guest = TokioIo::new(upgraded);
                        let mut counted = counted;
                        tokio::io::copy_bidirectional(&mut guest, &mut counted)
                            .await
                            .map(|_| ())
                            .or_else(ended_quietly)
                    }
                    Err(e) => Err(format!("the guest's side of the tunnel: {e}")),
                }
            };
            let outcome = tokio::select! {
                outcome = tunnel => outcome,
                _ = stop.cancelled() => Err("cut: the VM's egress stopped".to_owned()),
            };
            finish(record, outcome, &gate);
        });
        return Ok(Response::new(empty()));
    }
    // Absolute form: the same request, in origin form, on the checked
    // connection.
    let (mut sender, conn) =
        match hyper::client::conn::http1::handshake(TokioIo::new(counted)).await {
            Ok(pair) => pair,
            Err(e) => {
                let why = format!("{host}:{port}: {e}");
                finish(record, Err(why.clone()), &vm.gate);
                return Ok(text(
                    StatusCode::BAD_GATEWAY,
                    &format!("nexus egress: {why}"),
                ));
            }
        };
    // Recorded when the connection ends (every byte counted) and the
    // request has come to something: the upstream's status, or why not.
    let (answer, answered) = tokio::sync::oneshot::channel::<Result<u16, String>>();
    let gate = vm.gate.clone();
    let stop = vm.stop.clone();
    tokio::spawn(async move {
        let ended = tokio::select! {
            ended = conn => ended.map_err(|e| e.to_string()),
            _ = stop.cancelled() => Err("cut: the VM's egress stopped".to_owned()),
        };
        let answer = answered
            .await
            .unwrap_or_else(|_| Err("no answer".to_owned()));
        let outcome = match (ended, answer) {
            (Err(why), _) | (Ok(()), Err(why)) => Err(why),
            (Ok(()), Ok(status)) => {
                record.status = Some(status);
                Ok(())
            }
        };
        finish(record, outcome, &gate);
    });
    let (mut parts, body) = req.into_parts();
    parts.uri = match origin_form(&parts.uri) {
        Some(uri) => uri,
        None => {
            let _ = answer.send(Err("bad request path".into()));
            return Ok(bad_path());
        }
    };
    strip_hop_headers(&mut parts.headers);
    set_host(&mut parts.headers, &host, port, 80);
    match sender.send_request(Request::from_parts(parts, body)).await {
        Ok(response) => {
            let _ = answer.send(Ok(response.status().as_u16()));
            let (mut parts, body) = response.into_parts();
            strip_hop_headers(&mut parts.headers);
            Ok(Response::from_parts(parts, body.boxed()))
        }
        Err(e) => {
            let why = format!("{host}:{port}: {e}");
            let _ = answer.send(Err(why.clone()));
            Ok(text(
                StatusCode::BAD_GATEWAY,
                &format!("nexus egress: {why}"),
            ))
        }
    }
}

/// The path and query alone: how a request goes to its origin.
pub(super) fn origin_form(uri: &hyper::Uri) -> Option<hyper::Uri> {
    uri.path_and_query()
        .map_or("/", |p| p.as_str())
        .parse()
        .ok()
}

/// The answer to a request whose path does not read.
pub(super) fn bad_path() -> Response<Body> {
    text(StatusCode::BAD_REQUEST, "nexus egress: bad request path")
}

/// Removes the headers of this hop: the usual ones and those the
/// sender named in Connection.
pub(super) fn strip_hop_headers(headers: &mut hyper::HeaderMap) {
    let named: Vec<String> = headers
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|n| n.trim().to_ascii_lowercase()))
        .collect();
    for name in HOP_HEADERS
        .iter()
        .copied()
        .chain(named.iter().map(String::as_str))
    {
        headers.remove(name);
    }
}

/// The host decided on is the host asked: the Host header says it.
pub(super) fn set_host(headers: &mut hyper::HeaderMap, host: &str, port: u16, default_port: u16) {
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    let authority = if port == default_port {
        host
    } else {
        format!("{host}:{port}")
    };
    if let Ok(value) = hyper::header::HeaderValue::from_str(&authority) {
        headers.insert(hyper::header::HOST, value);
    }
}

/// A tunnel's end by reset or broken pipe is how many clients close.
pub(super) fn ended_quietly(e: std::io::Error) -> Result<(), String> {
    match e.kind() {
        std::io::ErrorKind::ConnectionReset
        | std::io::ErrorKind::BrokenPipe
        | std::io::ErrorKind::UnexpectedEof => Ok(()),
        _ => Err(e.to_string()),
    }
}

/// Decides, resolves, checks every address, connects: the connection,
/// or the status and reason to answer.
pub(super) async fn open(
    vm: &Vm,
    rules: &super::Rules,
    host: &str,
    port: u16,
) -> Result<TcpStream, (StatusCode, String)> {
    if !rules.lists.iter().all(|l| l.allows(host, port)) {
        return Err((
            StatusCode::FORBIDDEN,
            format!(
                "{host}:{port} is not on VM {}'s egress allowlist (set_egress, or its owner's role)",
                vm.name
            ),
        ));
    }
    // One deadline for resolving and connecting together.
    match tokio::time::timeout(
        vm.settings.connect_timeout,
        resolve_and_connect(vm, host, port),
    )
    .await
    {
        Ok(result) => result,
        Err(_) => Err((
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "resolving and connecting to {host}:{port} took over {:?}",
                vm.settings.connect_timeout
            ),
        )),
    }
}

/// Lookups at once, all VMs together: getaddrinfo runs on the blocking
/// pool nexusd's storage shares, and a name server that never answers
/// holds a thread for each lookup.
static LOOKUPS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(32);

async fn resolve_and_connect(
    vm: &Vm,
    host: &str,
    port: u16,
) -> Result<TcpStream, (StatusCode, String)> {
    let timeout = vm.settings.connect_timeout;
    let pinned = vm.settings.hosts.get(&host.to_ascii_lowercase());
    let resolved: Vec<SocketAddr> = match pinned {
        Some(addrs) => addrs.iter().map(|ip| SocketAddr::new(*ip, port)).collect(),
        None => match tokio::time::timeout(timeout, async {
            let _lookup = LOOKUPS.acquire().await;
            tokio::net::lookup_host((host, port)).await
        })
        .await
        {
            Ok(Ok(addrs)) => addrs.collect(),
            Ok(Err(e)) => {
                return Err((
                    StatusCode::BAD_GATEWAY,
                    format!("cannot resolve {host}: {e}"),
                ));
            }
            Err(_) => {
                return Err((
                    StatusCode::GATEWAY_TIMEOUT,
                    format!("resolving {host} timed out"),
                ));
            }
        },
    };
    if resolved.is_empty() {
        return Err((StatusCode::BAD_GATEWAY, format!("{host} has no address")));
    }
    // Every address, not just the first: a name must not lead anywhere
    // the host's networks are.
    let host_addresses = addresses::host_addresses_now();
    for addr in &resolved {
        if let Some(why) =
            addresses::refused(addr.ip(), &host_addresses, vm.settings.allow_loopback)
        {
            return Err((
                StatusCode::FORBIDDEN,
                format!("{host} resolves to {}, {why}: refused", addr.ip()),
            ));
        }
    }
    let mut last = String::new();
    for addr in resolved {
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                // A proxy passes bytes on as they come: no Nagle delay
                // on small writes (a request head, a TLS record).
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(e)) => last = format!("connecting to {host} ({addr}): {e}"),
            Err(_) => last = format!("connecting to {host} ({addr}) timed out"),
        }
    }
    Err((StatusCode::BAD_GATEWAY, last))
}

pub(super) fn text(status: StatusCode, message: &str) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(format!("{message}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

pub(super) fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

/// The upstream connection, counting bytes each way.
pub(super) struct Counted {
    inner: TcpStream,
    up: Arc<AtomicU64>,
    down: Arc<AtomicU64>,
}

impl Counted {
    fn new(inner: TcpStream) -> Self {
        Self::with(inner, &Arc::default(), &Arc::default())
    }

    /// Counting into counters shared with other connections.
    pub(super) fn with(inner: TcpStream, up: &Arc<AtomicU64>, down: &Arc<AtomicU64>) -> Self {
        Self {
            inner,
            up: up.clone(),
            down: down.clone(),
        }
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = (buf.filled().len() - before) as u64;
        self.down.fetch_add(read, Ordering::Relaxed);
        polled
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            self.up.fetch_add(*n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
