//! Drives `HyperTransport` as hard as it goes: `--requests` form POSTs to `--url` from
//! `--concurrency` spawned tasks, then prints the rate and the CPU time per request.
//!
//! `cargo run --release -p c2dm-hyper --example load -- --url http://127.0.0.1:PORT/c2dm/send
//! --requests 100000 --concurrency 64 [--ca-cert emulator.pem] [--token T]`
//!
//! `cargo xtask bench` runs it against the emulator beside `wrk`. With `--bare` it drives a
//! plain hyper-util pooled client instead (plain HTTP only): the floor `HyperTransport` is
//! built on, for comparison.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use c2dm_core::{Transport, TransportError};
use c2dm_hyper::HyperTransport;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Either transport behind one interface.
#[derive(Clone)]
enum Driver {
    Ours(HyperTransport),
    Bare(Box<Client<HttpConnector, Full<Bytes>>>),
}

impl Driver {
    async fn status(&self, request: http::Request<Bytes>) -> Result<u16, TransportError> {
        match self {
            Self::Ours(t) => t.execute(request).await.map(|r| r.status().as_u16()),
            Self::Bare(c) => {
                let (parts, body) = request.into_parts();
                let response = c
                    .request(http::Request::from_parts(parts, Full::new(body)))
                    .await
                    .map_err(|e| {
                        TransportError::new(
                            c2dm_core::TransportErrorKind::Other,
                            c2dm_core::RequestSent::Maybe,
                        )
                        .with_message(e.to_string())
                    })?;
                let status = response.status().as_u16();
                let _ = response.into_body().collect().await;
                Ok(status)
            }
        }
    }
}

fn cpu_seconds() -> f64 {
    // Linux: the process's user and system time from /proc/self/stat, in clock ticks (100/s).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_name = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let url = get("--url").expect("--url URL");
    let requests: u64 = get("--requests").map_or(100_000, |v| v.parse().expect("--requests N"));
    let concurrency: u64 = get("--concurrency").map_or(64, |v| v.parse().expect("--concurrency N"));
    let token = get("--token").unwrap_or_else(|| "BENCH".into());
    let mut builder = HyperTransport::builder();
    if let Some(path) = get("--ca-cert") {
        let pem = std::fs::read(path).expect("--ca-cert FILE");
        builder = builder
            .add_root_certificates_pem(&pem)
            .expect("a PEM certificate");
    }
    let transport = if args.iter().any(|a| a == "--bare") {
        Driver::Bare(Box::new(Client::builder(TokioExecutor::new()).build_http()))
    } else {
        Driver::Ours(builder.build().expect("transport"))
    };
    let threads: usize = get("--threads").map_or(0, |v| v.parse().expect("--threads N"));
    let runtime = match threads {
        0 => tokio::runtime::Builder::new_multi_thread(),
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    }
    .enable_all()
    .build()
    .expect("runtime");
    let failures = Arc::new(AtomicU64::new(0));
    let cpu_before = cpu_seconds();
    let start = Instant::now();
    runtime.block_on(async {
        let next = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (0..concurrency)
            .map(|_| {
                let transport = transport.clone();
                let next = Arc::clone(&next);
                let failures = Arc::clone(&failures);
                // Parsed once, as a sender holds its endpoint and token: what is measured is
                // the transport, not the parsing of a URL per request.
                let uri: http::Uri = url.parse().expect("--url URL");
                let auth = http::HeaderValue::try_from(format!("GoogleLogin auth={token}"))
                    .expect("--token TOKEN");
                tokio::spawn(async move {
                    loop {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        if n >= requests {
                            return;
                        }
                        let body = format!(
                            "registration_id=device-{n}&collapse_key=k&data.message=test&data.sound=t"
                        );
                        let mut request = http::Request::new(Bytes::from(body));
                        *request.method_mut() = http::Method::POST;
                        *request.uri_mut() = uri.clone();
                        let headers = request.headers_mut();
                        headers.insert(
                            http::header::CONTENT_TYPE,
                            http::HeaderValue::from_static(
                                "application/x-www-form-urlencoded;charset=UTF-8",
                            ),
                        );
                        headers.insert(http::header::AUTHORIZATION, auth.clone());
                        match transport.status(request).await {
                            Ok(200) => {}
                            _ => {
                                failures.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("task");
        }
    });
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_before;
    println!(
        "{{\"requests\":{requests},\"failures\":{},\"elapsed_secs\":{elapsed:.3},\"rate\":{:.0},\"cpu_us_per_request\":{:.2}}}",
        failures.load(Ordering::Relaxed),
        requests as f64 / elapsed,
        cpu * 1e6 / requests as f64
    );
}
