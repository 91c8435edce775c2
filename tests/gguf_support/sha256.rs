//! sha256 hex digests of metadata and tensor bytes, compared with what Python's `hashlib`
//! wrote into tests/data/gguf/smollm2_metadata.json.

use sha2::{Digest, Sha256};

pub fn hex(data: &[u8]) -> String {
    format!("{:x}", Sha256::digest(data))
}
