//! The manifest parser on arbitrary bytes: errors, never panics, never allocates from
//! unchecked sizes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(manifest) = cairn::format::manifest::Manifest::decode(data, "fuzz/manifest.json") {
        // Whatever parses must re-encode and parse back to the same manifest.
        let again = cairn::format::manifest::Manifest::decode(&manifest.encode().unwrap(), "fuzz/again.json").unwrap();
        assert_eq!(again, manifest);
        // What a standalone copy would hold refers to nothing and parses back.
        if let Ok(alone) = manifest.standalone() {
            assert!(!alone.has_references());
            let again = cairn::format::manifest::Manifest::decode(&alone.encode().unwrap(), "fuzz/alone.json").unwrap();
            assert_eq!(again, alone);
        }
    }
});
