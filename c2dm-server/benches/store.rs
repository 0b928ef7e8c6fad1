//! The SQLite store alone, per row: what a batch's writes and a walk's reads cost without
//! the sends around them.
//!
//! `cargo bench -p c2dm-server --bench store`

use std::time::{Duration, SystemTime};

use c2dm_core::OutcomeKind;
use c2dm_server::jobs::{Queues, WorkerOptions};
use c2dm_server::store::{Audience, DeliveryRow, Everyone, NewDevice, NewPush, Store};
use criterion::{Criterion, Throughput, criterion_main};

/// Rows a batch writes at a time (the server's flush).
const FLUSH: usize = 250;
/// Devices a walk reads at a time (the server's page).
const PAGE: u32 = 1000;
/// Devices registered for the walk.
const DEVICES: usize = 20_000;

fn store(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("bench.db").display());
    let store = rt.block_on(Store::open_sqlite(&url)).unwrap();
    // The queues' tables: a push is stored with its job.
    let _queues = rt
        .block_on(Queues::open_beside(&store, &WorkerOptions::default()))
        .unwrap();

    let (id, run) = rt.block_on(async {
        let (_, push) = store
            .create_push(&NewPush {
                idempotency_key: None,
                audience: Audience::RegistrationIds {
                    registration_ids: vec!["bench-device".into()],
                },
                collapse_key: "k".into(),
                data: vec![("message".into(), "test".into())],
                delay_while_idle: false,
            })
            .await
            .unwrap();
        let run = store.claim_batch(push.id, "bench-batch").await.unwrap();
        (push.id, run)
    });
    let mut next = 0u64;
    let mut group = c.benchmark_group("sqlite store");
    group.throughput(Throughput::Elements(FLUSH as u64));
    group.bench_function("record 250 delivery rows", |b| {
        b.iter(|| {
            let at = SystemTime::now();
            let rows: Vec<DeliveryRow> = (0..FLUSH)
                .map(|_| {
                    next += 1;
                    DeliveryRow {
                        registration_id: format!("device-{next:010}"),
                        outcome: OutcomeKind::Accepted,
                        message_id: Some(format!("0:{next}%bench")),
                        error: None,
                        attempts: 1,
                        possible_duplicates: 0,
                        at,
                    }
                })
                .collect();
            assert!(
                rt.block_on(store.record_batch(id, &run, &rows, &[]))
                    .unwrap()
            );
        })
    });

    rt.block_on(async {
        for i in 0..DEVICES {
            store
                .upsert_device(&NewDevice {
                    registration_id: format!("walk-{i:08}"),
                    ..NewDevice::default()
                })
                .await
                .unwrap();
        }
    });
    let everyone = Audience::All(Everyone::All);
    let mut after = None;
    group.throughput(Throughput::Elements(u64::from(PAGE)));
    group.bench_function("read a page of 1000 devices", |b| {
        b.iter(|| {
            let page = rt
                .block_on(store.audience_page(&everyone, after, PAGE))
                .unwrap();
            assert_eq!(page.items.len(), PAGE as usize);
            // Round and round the registry, never past its last full page.
            after = page
                .next
                .filter(|&at| at < (DEVICES - PAGE as usize) as i64);
        })
    });
    group.finish();
}

fn benches() {
    let mut c = Criterion::default()
        .configure_from_args()
        .measurement_time(Duration::from_secs(5));
    store(&mut c);
}

criterion_main!(benches);
