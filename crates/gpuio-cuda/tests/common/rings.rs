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

/// Whether `got`, line `line` as read from the file, is version `ver` — or, where the write of
/// version `ver + 1` failed and may have landed in part (`maybe`: a short write, then EIO on the
/// rest), each 8-byte word of it is the old version's or the new one's.
pub fn line_on_disk_ok(line_bytes: usize, got: &[u8], line: u64, ver: u64, maybe: bool) -> bool {
    let old = line_content(line_bytes, line, ver);
    if !maybe {
        return got == &old[..];
    }
    let new = line_content(line_bytes, line, ver + 1);
    (0..line_bytes / 8).all(|w| {
        let r = w * 8..w * 8 + 8;
        got[r.clone()] == old[r.clone()] || got[r.clone()] == new[r]
    })
}
