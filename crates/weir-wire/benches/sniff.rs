//! ClientHello sniffing: the parser's cost per hello, on real captures.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use weir_wire::sniff::{Sniffed, parse_client_hello};

fn testdata(file: &str) -> Vec<u8> {
    weir_testdata::read(&format!("clienthello/{file}"))
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
