//! An intercepted connection: the guest asked to CONNECT to a host one
//! of its secrets is bound to. The proxy answers the guest's TLS with a
//! leaf of Nexus's CA, reads each HTTP/1.1 request, checks it against the
//! VM's rules as they are now (a revoked grant counts from the next
//! request), puts the secrets into its headers and sends it on over its
//! own TLS connection to the checked address, verified as any client
//! would. One audit row for the connection (its requests, bytes and the
//! secrets used by name), one more for each request refused.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::{TlsAcceptor, TlsConnector, client::TlsStream};

use super::proxy::{
    Body, Counted, Slot, Vm, bad_path, open, origin_form, set_host, strip_hop_headers, text,
};
use super::secrets::Scrubber;
use super::{Outcome, Record};

type Upstream = TlsStream<Counted>;

/// Opens TLS to the upstream on `counted`, verified for `host`, within
/// the connect deadline.
pub(super) async fn connect_tls(
    vm: &Vm,
    host: &str,
    port: u16,
    counted: Counted,
) -> Result<Upstream, String> {
    let config = vm
        .settings
        .upstream_tls
        .clone()
        .ok_or("nexusd has no upstream TLS configuration")?;
    let name = ServerName::try_from(host.to_owned())
        .map_err(|e| format!("{host} is no TLS server name: {e}"))?;
    match tokio::time::timeout(
        vm.settings.connect_timeout,
        TlsConnector::from(config).connect(name, counted),
    )
    .await
    {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(e)) => Err(format!("TLS to {host}:{port}: {e}")),
        Err(_) => Err(format!(
            "TLS to {host}:{port} took over {:?}",
            vm.settings.connect_timeout
        )),
    }
}

/// One intercepted connection's state.
struct Conn {
    vm: Arc<Vm>,
    host: String,
    port: u16,
    /// The upstream connection; made again when the upstream closed it.
    upstream: tokio::sync::Mutex<Option<SendRequest<Incoming>>>,
    counters: (Arc<AtomicU64>, Arc<AtomicU64>),
    requests: AtomicU64,
    used: std::sync::Mutex<Vec<String>>,
}

/// Serves the guest's side once the CONNECT is answered: TLS with a
/// leaf for `host`, then its requests, until either side ends or the
/// VM's egress stops. The connection's slot is held throughout.
pub(super) async fn serve(
    vm: Arc<Vm>,
    slot: Slot,
    req: Request<Incoming>,
    upstream: Upstream,
    mut record: Record,
    counters: (Arc<AtomicU64>, Arc<AtomicU64>),
    started: Instant,
) {
    let _slot = slot;
    let host = record.host.clone();
    let port = record.port;
    let conn = Arc::new(Conn {
        vm: vm.clone(),
        host: host.clone(),
        port,
        upstream: tokio::sync::Mutex::new(None),
        counters: counters.clone(),
        requests: AtomicU64::new(0),
        used: Default::default(),
    });
    let outcome = tokio::select! {
        outcome = async {
            *conn.upstream.lock().await = Some(handshake(&vm, upstream).await?);
            let config = vm
                .settings
                .authority
                .as_ref()
                .ok_or("nexusd has no CA")?
                .server_config(&host)?;
            let upgraded = hyper::upgrade::on(req)
                .await
                .map_err(|e| format!("the guest's side of the connection: {e}"))?;
            let tls = tokio::time::timeout(
                vm.settings.header_timeout,
                TlsAcceptor::from(config).accept(TokioIo::new(upgraded)),
            )
            .await
            .map_err(|_| "the guest's TLS handshake took too long".to_owned())?
            .map_err(|e| format!("the guest's TLS handshake: {e} (does the guest trust Nexus's CA?)"))?;
            let service = hyper::service::service_fn({
                let conn = conn.clone();
                move |req| forward(conn.clone(), req)
            });
            hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(vm.settings.header_timeout)
                .serve_connection(TokioIo::new(tls), service)
                .await
                // A kept-alive connection the guest let idle ends by the
                // header timeout: a normal end.
                .or_else(|e| if e.is_incomplete_message() || e.is_closed() || e.is_timeout() { Ok(()) } else { Err(e.to_string()) })
        } => outcome,
        _ = vm.stop.cancelled() => Err("cut: the VM's egress stopped".to_owned()),
    };
    record.outcome = match outcome {
        Ok(()) => Outcome::Ok,
        Err(why) => Outcome::Failed(why),
    };
    record.requests = conn.requests.load(Ordering::Relaxed);
    record.secrets = super::lock(&conn.used).clone();
    record.bytes_up = counters.0.load(Ordering::Relaxed);
    record.bytes_down = counters.1.load(Ordering::Relaxed);
    record.took = started.elapsed();
    vm.gate.record(record);
}

/// An HTTP/1.1 client on an upstream TLS connection; the connection is
/// driven until it ends or the VM's egress stops.
async fn handshake(vm: &Vm, upstream: Upstream) -> Result<SendRequest<Incoming>, String> {
    let (sender, driver) = hyper::client::conn::http1::handshake(TokioIo::new(upstream))
        .await
        .map_err(|e| format!("HTTP to the upstream: {e}"))?;
    let stop = vm.stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = driver => {}
            _ = stop.cancelled() => {}
        }
    });
    Ok(sender)
}

/// One request from the guest: checked, given its secrets, sent on.
async fn forward(conn: Arc<Conn>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    conn.requests.fetch_add(1, Ordering::Relaxed);
    let vm = &conn.vm;
    let (host, port) = (conn.host.as_str(), conn.port);
    let refuse = |identity: String, method: String, status: StatusCode, why: String| {
        vm.gate.record(Record {
            vm: vm.name.clone(),
            identity,
            method,
            host: host.to_owned(),
            port,
            outcome: Outcome::Denied(why.clone()),
            bytes_up: 0,
            bytes_down: 0,
            took: started.elapsed(),
            intercepted: true,
            requests: 1,
            secrets: Vec::new(),
            status: None,
        });
        Ok(text(status, &format!("nexus egress: {why}")))
    };
    let method = req.method().to_string();
    // TRACE sends the request back, injected secrets included.
    if req.method() == hyper::Method::TRACE || req.method() == hyper::Method::CONNECT {
        return Ok(text(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("nexus egress: {method} is not sent to hosts nexusd puts secrets in"),
        ));
    }
    // The rules now, not the connection's: grants and lists change.
    let rules = match vm.gate.rules(&vm.name) {
        Ok(rules) => rules,
        Err(why) => return refuse(String::new(), method, StatusCode::FORBIDDEN, why),
    };
    if !rules.lists.iter().all(|l| l.allows(host, port)) {
        let why = format!(
            "{host}:{port} is no longer on VM {}'s egress allowlist",
            vm.name
        );
        return refuse(rules.identity, method, StatusCode::FORBIDDEN, why);
    }
    let (mut parts, body) = req.into_parts();
    parts.uri = match origin_form(&parts.uri) {
        Some(uri) => uri,
        None => return Ok(bad_path()),
    };
    if let Err(why) =
        rules
            .granted
            .refuse_unplaced(host, port, &parts.uri.to_string(), &parts.headers, true)
    {
        return refuse(rules.identity, method, StatusCode::FORBIDDEN, why);
    }
    strip_hop_headers(&mut parts.headers);
    set_host(&mut parts.headers, host, port, 443);
    let used = rules.granted.inject(host, port, &mut parts.headers);
    {
        let mut all = super::lock(&conn.used);
        for name in &used.names {
            if !all.contains(name) {
                all.push(name.clone());
            }
        }
    }
    let scrubber = Scrubber::new(used.forms);
    if !scrubber.is_empty() {
        // An answer that quotes the request must be readable to be
        // cleaned: no compression.
        parts.headers.insert(
            hyper::header::ACCEPT_ENCODING,
            hyper::header::HeaderValue::from_static("identity"),
        );
    }
    let mut upstream = conn.upstream.lock().await;
    // The upstream may have closed its side (keep-alive ended): a new
    // connection, decided and checked again.
    let alive = match upstream.as_mut() {
        Some(sender) => sender.ready().await.is_ok(),
        None => false,
    };
    if !alive {
        *upstream = None;
        let reopened = async {
            let stream = open(vm, &rules, host, port).await.map_err(|(_, why)| why)?;
            let counted = Counted::with(stream, &conn.counters.0, &conn.counters.1);
            let tls = connect_tls(vm, host, port, counted).await?;
            handshake(vm, tls).await
        };
        match reopened.await {
            Ok(sender) => *upstream = Some(sender),
            Err(why) => {
                return Ok(text(
                    StatusCode::BAD_GATEWAY,
                    &format!("nexus egress: {why}"),
                ));
            }
        }
    }
    let Some(sender) = upstream.as_mut() else {
        return Ok(text(
            StatusCode::BAD_GATEWAY,
            "nexus egress: no upstream connection",
        ));
    };
    match sender.send_request(Request::from_parts(parts, body)).await {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            strip_hop_headers(&mut parts.headers);
            if scrubber.is_empty() {
                return Ok(Response::from_parts(parts, body.boxed()));
            }
            for value in parts.headers.values_mut() {
                let mut bytes = value.as_bytes().to_vec();
                scrubber.mask(&mut bytes);
                if let Ok(masked) = hyper::header::HeaderValue::from_bytes(&bytes) {
                    *value = masked;
                }
            }
            Ok(Response::from_parts(parts, scrubbed(body, scrubber)))
        }
        Err(e) => Ok(text(
            StatusCode::BAD_GATEWAY,
            &format!("nexus egress: {host}:{port}: {e}"),
        )),
    }
}

/// `body` with every form of the request's secrets masked as it streams.
fn scrubbed(body: Incoming, scrubber: Scrubber) -> Body {
    use hyper::body::{Bytes, Frame};
    struct State {
        body: Incoming,
        scrubber: Scrubber,
        /// Frames to send before reading on (held-back bytes, then trailers).
        queue: std::collections::VecDeque<Result<Frame<Bytes>, hyper::Error>>,
        done: bool,
    }
    let state = State {
        body,
        scrubber,
        queue: Default::default(),
        done: false,
    };
    let stream = futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(next) = st.queue.pop_front() {
                return Some((next, st));
            }
            if st.done {
                return None;
            }
            match st.body.frame().await {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let out = st.scrubber.push(&data);
                        if !out.is_empty() {
                            st.queue.push_back(Ok(Frame::data(Bytes::from(out))));
                        }
                    }
                    Err(trailers) => {
                        let rest = st.scrubber.finish();
                        if !rest.is_empty() {
                            st.queue.push_back(Ok(Frame::data(Bytes::from(rest))));
                        }
                        st.queue.push_back(Ok(trailers));
                    }
                },
                Some(Err(e)) => {
                    st.queue.push_back(Err(e));
                    st.done = true;
                }
                None => {
                    let rest = st.scrubber.finish();
                    if !rest.is_empty() {
                        st.queue.push_back(Ok(Frame::data(Bytes::from(rest))));
                    }
                    st.done = true;
                }
            }
        }
    });
    http_body_util::StreamBody::new(stream).boxed()
}
