//! The codec alone: building, encoding and decoding, per message.
//!
//! `cargo bench -p c2dm-core`

use std::hint::black_box;
use std::time::SystemTime;

use c2dm_core::codec::{self, SendForm};
use c2dm_core::{AuthToken, Message, RegistrationId};
use criterion::{Criterion, criterion_main};
use http::{HeaderMap, StatusCode};

fn codec(c: &mut Criterion) {
    let token = AuthToken::new("DQAAAGgA-benchmark-token").unwrap();
    let endpoint = codec::default_send_uri();
    let template = Message::builder("APA91bHun4MxP5egoKMwt2KZFBaFUH-1RYqx")
        .collapse_key("orders")
        .data("message", "shipped")
        .data("sound", "default")
        .build()
        .unwrap();
    c.bench_function("build a message", |b| {
        b.iter(|| {
            Message::builder(black_box("APA91bHun4MxP5egoKMwt2KZFBaFUH-1RYqx"))
                .collapse_key("orders")
                .data("message", "shipped")
                .data("sound", "default")
                .build()
                .unwrap()
        })
    });
    let id = RegistrationId::new("APA91b-other-device").unwrap();
    c.bench_function("fan a template out to one device", |b| {
        b.iter(|| template.with_registration_id(black_box(id.clone())))
    });
    c.bench_function("encode a send request", |b| {
        b.iter(|| codec::encode_send_request(black_box(&template), &token, &endpoint))
    });
    let body = codec::encode_send_form(&template);
    c.bench_function("parse a send form", |b| {
        b.iter(|| SendForm::parse(black_box(&body)))
    });
    let headers = HeaderMap::new();
    let now = SystemTime::now();
    c.bench_function("decode an accepted answer", |b| {
        b.iter(|| {
            codec::decode_send_response(
                StatusCode::OK,
                &headers,
                black_box(b"id=0:1326885481081626%900b347100019e5f\n"),
                now,
            )
        })
    });
    c.bench_function("decode an error answer", |b| {
        b.iter(|| {
            codec::decode_send_response(
                StatusCode::OK,
                &headers,
                black_box(b"Error=NotRegistered"),
                now,
            )
        })
    });
}

// The macros generate undocumented items.
#[allow(missing_docs)]
mod group {
    criterion::criterion_group!(benches, super::codec);
}
criterion_main!(group::benches);
