//! Criterion benchmarks of Cairn's internals: checksums, shard header building, manifest
//! encode/decode with 100,000 tensors, listing a run of 10,000 checkpoints.
//! `cargo bench -p cairn --bench internals`

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use cairn::format::layout;
use cairn::format::manifest::{FileRecord, Manifest, PieceRecord, TensorRecord, Writer, FORMAT_NAME, FORMAT_VERSION};
use cairn::format::shard::{build_header, ShardEntry};
use cairn::{DType, Location, Run};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use object_store::memory::InMemory;
use object_store::{ObjectStoreExt, PutPayload};

fn checksums(c: &mut Criterion) {
    let data = vec![7u8; 64 << 20];
    let mut group = c.benchmark_group("crc32c");
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.bench_function("64MiB", |b| b.iter(|| cairn::format::checksum::crc32c(std::hint::black_box(&data))));
    group.finish();
}

fn shard_header(c: &mut Criterion) {
    let entries: Vec<ShardEntry> = (0..1000)
        .map(|i| ShardEntry { name: format!("model.layers.{i}.weight"), dtype: DType::F32, shape: vec![1024, 1024] })
        .collect();
    c.bench_function("shard_header/1000_tensors", |b| b.iter(|| build_header(&entries, HashMap::new()).unwrap()));
}

fn big_manifest(tensors: usize) -> Manifest {
    let file = layout::shard_file(0, 0, 1, "bench");
    let mut map = BTreeMap::new();
    for i in 0..tensors {
        let start = 4096 + i as u64 * 64;
        map.insert(
            format!("model.layers.{}.block.{}.weight", i / 100, i % 100),
            TensorRecord {
                dtype: DType::F32,
                shape: vec![4, 4],
                pieces: vec![PieceRecord {
                    file: file.clone(),
                    range: [start, start + 64],
                    offsets: vec![0, 0],
                    shape: vec![4, 4],
                    crc32c: i as u32,
                    xxh3: None,
                    sample: None,
                }],
            },
        );
    }
    let files =
        BTreeMap::from([(file, FileRecord { size: 4096 + tensors as u64 * 64, header_len: 4096, header_crc32c: 0 })]);
    Manifest {
        format: FORMAT_NAME.into(),
        format_version: FORMAT_VERSION,
        step: 1,
        created_unix_ms: 0,
        temporary: false,
        save_id: "bench".into(),
        writer: Writer { library: "cairn".into(), version: "bench".into(), world_size: 1 },
        metrics: BTreeMap::new(),
        metadata: serde_json::Value::Null,
        values: BTreeMap::new(),
        structure: None,
        tensors: map,
        files,
        ranks: BTreeMap::new(),
        timings: None,
        part: None,
    }
}

fn manifest(c: &mut Criterion) {
    let manifest = big_manifest(100_000);
    let bytes = manifest.encode().unwrap();
    let mut group = c.benchmark_group("manifest_100k_tensors");
    group.sample_size(10);
    group.bench_function("encode", |b| b.iter(|| manifest.encode().unwrap()));
    group.bench_function("decode_and_validate", |b| b.iter(|| Manifest::decode(&bytes, "bench").unwrap()));
    group.finish();
}

fn listing(c: &mut Criterion) {
    let mut group = c.benchmark_group("list_run");
    group.sample_size(10);
    let count = 10_000u64;
    {
        let store = Arc::new(InMemory::new());
        let loc = Location::from_store(store.clone(), "memory://bench");
        cairn::runtime::block_on(async {
            for step in 0..count {
                let dir = layout::step_dir(step);
                store.put(&loc.path(&format!("{dir}/manifest.json")), PutPayload::from_static(b"{}")).await.unwrap();
                store
                    .put(
                        &loc.path(&format!("{dir}/shards/r00000-00000-of-00001-x.safetensors")),
                        PutPayload::from_static(b"x"),
                    )
                    .await
                    .unwrap();
            }
            Ok(())
        })
        .unwrap();
        let run = Run::at(loc);
        group.bench_with_input(BenchmarkId::new("checkpoints", count), &run, |b, run| b.iter(|| run.list().unwrap()));
    }
    {
        // The same run on local disk (what `Run::list` costs on a real file system).
        let dir = tempfile::tempdir().unwrap();
        for step in 0..count {
            let shards = dir.path().join(layout::step_dir(step)).join("shards");
            std::fs::create_dir_all(&shards).unwrap();
            std::fs::write(shards.parent().unwrap().join("manifest.json"), b"{}").unwrap();
            std::fs::write(shards.join("r00000-00000-of-00001-x.safetensors"), b"x").unwrap();
        }
        let run = Run::at(Location::open(dir.path().to_str().unwrap()).unwrap());
        group.bench_with_input(BenchmarkId::new("checkpoints_on_local_disk", count), &run, |b, run| {
            b.iter(|| run.list().unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, checksums, shard_header, manifest, listing);
criterion_main!(benches);
