//! Format v1: the manifest (the commit record), the safetensors shard files and the names
//! of things inside a run. Pure code, no I/O, so every parser here can be fuzzed and
//! property-tested on bytes alone. `docs/format.md` is the normative description.

pub mod checksum;
pub mod layout;
pub mod manifest;
pub mod shard;
