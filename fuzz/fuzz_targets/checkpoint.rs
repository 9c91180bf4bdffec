//! A hostile checkpoint: the input is split into a manifest and one shard file, stored in
//! memory, then loaded and verified. Every failure must be an error, never a panic, and
//! no allocation may be sized by an unchecked claim in the input.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use object_store::memory::InMemory;
use object_store::{ObjectStoreExt, PutPayload};

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let at = (split as usize * rest.len() / 255).min(rest.len());
    let (manifest, shard) = rest.split_at(at);
    let store = Arc::new(InMemory::new());
    let loc = cairn::Location::from_store(store, "memory://fuzz");
    let (m, s) = (manifest.to_vec(), shard.to_vec());
    let put = loc.clone();
    let _ = cairn::runtime::block_on(async move {
        put.store().put(&put.path("manifest.json"), PutPayload::from(m)).await.unwrap();
        put.store().put(&put.path("shards/r00000-00000-of-00001-fuzz.safetensors"), PutPayload::from(s)).await.unwrap();
        Ok(())
    });
    if let Ok(ckpt) = cairn::open_at(loc) {
        let _ = ckpt.load(&cairn::LoadOptions::default());
        let _ = ckpt.verify();
    }
});
