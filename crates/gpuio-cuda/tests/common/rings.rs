//! What the request-ring tests (`rings.rs`, `rings_mock.rs`) share.

/// The bytes of `line` at `version` (0: as the file was created), `line_bytes` long. Every 8-byte word
/// names its line, version and position, so a misplaced or stale line cannot pass for the right one.
pub fn line_content(line_bytes: usize, line: u64, version: u64) -> Vec<u8> {
    (0..line_bytes / 8)
        .flat_map(|i| {
            let w = (line << 40) ^ (version << 20) ^ i as u64 ^ 0x5a5a_0000_0000_a5a5;
            w.to_le_bytes()
        })
        .collect()
}
