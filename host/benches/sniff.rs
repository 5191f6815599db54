//! ClientHello sniffing: the parser's cost per hello, on real captures.

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use weir::sniff::{Sniffed, parse_client_hello};

fn testdata(file: &str) -> Vec<u8> {
    let dir = std::env::var_os("WEIR_TESTDATA").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata"),
        PathBuf::from,
    );
    let path = dir.join("clienthello").join(file);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn sniff(c: &mut Criterion) {
    let mut group = c.benchmark_group("sniff");
    for file in [
        "openssl-tls13-sni.bin",
        "curl-http2.bin",
        "chromium-pq-ech.bin",
        "synthetic-openssl-tls13-3records.bin",
    ] {
        let hello = testdata(file);
        assert!(
            matches!(parse_client_hello(&hello), Ok(Sniffed::Hello(_))),
            "{file} must parse"
        );
        group.throughput(Throughput::Bytes(hello.len() as u64));
        group.bench_function(file, |b| b.iter(|| parse_client_hello(black_box(&hello))));
    }
    group.finish();
}

criterion_group!(benches, sniff);
criterion_main!(benches);
