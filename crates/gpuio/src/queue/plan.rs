//! Splitting one command (a file range ↔ a memory range) into tasks the backend can issue.
//!
//! Pure arithmetic, no I/O: given the file's direct-I/O alignment and the buffer's address, a command
//! becomes at most three segments — an unaligned head, an aligned middle, an unaligned tail — and each
//! segment yields tasks of at most the task size:
//!
//! | segment      | read                                   | write                                     |
//! |--------------|----------------------------------------|-------------------------------------------|
//! | aligned, memory co-aligned | `Direct`: O_DIRECT straight into the buffer | `Direct`: O_DIRECT straight from the buffer |
//! | aligned, memory not co-aligned | `BounceRead`: O_DIRECT into a bounce buffer, then copied | `BounceWrite`: copied into a bounce buffer, then O_DIRECT |
//! | head / tail (unaligned) | `BounceRead` of the enclosing blocks, then copied | `Buffered`: pwrite through the page cache |
//!
//! Unaligned write heads and tails go through the page cache rather than a read-modify-write of the
//! block: two stores into the same block in one command buffer would otherwise race, and the kernel
//! already keeps page-cache and direct I/O of one file coherent (a direct read flushes dirty cached
//! pages of its range first) — as long as no page is written both ways at once, which is why the
//! engine plans stores with a block of at least the OS page size. Files without O_DIRECT use
//! `Buffered` for everything.

/// The OS page size (the page cache's granularity), 4096 if it cannot be read.
fn os_page_bytes() -> u64 {
    static PAGE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    // SAFETY: sysconf reads a system constant.
    *PAGE.get_or_init(|| match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as u64,
        _ => 4096,
    })
}

/// The block direct transfers of a file with alignment `align` are planned in. A write's block is at
/// least the OS page: its buffered parts must not share a page with direct ones (nor with another
/// write's direct blocks), or the kernel cannot invalidate a page dirtied during a direct write,
/// warns "Page cache invalidation failure on direct I/O", fails the next fsync with EIO and may
/// write the stale page back.
pub(crate) fn direct_block(align: crate::file::DirectAlign, write: bool) -> u64 {
    let block = (align.offset_align as u64).max(512);
    if write {
        block.max(os_page_bytes())
    } else {
        block
    }
}

/// How one segment's bytes travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SegKind {
    /// Direct descriptor, user memory.
    Direct,
    /// Buffered descriptor, user memory.
    Buffered,
    /// Direct read of the enclosing aligned blocks into a bounce buffer, then a copy out.
    BounceRead,
    /// Copy into a bounce buffer, then a direct write (the range is aligned).
    BounceWrite,
}

/// A contiguous piece of a command, `file_start..file_end`, whose memory starts `mem_start` bytes into
/// the command's buffer range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Segment {
    pub kind: SegKind,
    pub file_start: u64,
    pub file_end: u64,
}

/// One task: the logical piece of the command it serves (`file_start..file_start+len`). For
/// `BounceRead`, the I/O covers the enclosing aligned range, `io_start..io_start+io_len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TaskPlan {
    pub kind: SegKind,
    pub file_start: u64,
    pub len: usize,
    pub io_start: u64,
    pub io_len: usize,
}

fn round_down(x: u64, a: u64) -> u64 {
    x - x % a
}
fn round_up(x: u64, a: u64) -> u64 {
    round_down(x + a - 1, a)
}

/// Inputs that decide a command's segments.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PlanInput {
    pub write: bool,
    pub direct: bool,
    /// File offset alignment for direct I/O (power of two).
    pub block: u64,
    /// Memory alignment for direct I/O.
    pub mem_align: u64,
    /// Address of the command's first byte in memory.
    pub mem_addr: usize,
    pub offset: u64,
    pub len: u64,
}

/// At most three segments, stored inline: planning a command allocates nothing.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Segments {
    items: [Segment; 3],
    len: u8,
}

impl Default for Segments {
    fn default() -> Segments {
        Segments::new()
    }
}

impl Segments {
    fn new() -> Segments {
        let none = Segment {
            kind: SegKind::Buffered,
            file_start: 0,
            file_end: 0,
        };
        Segments {
            items: [none; 3],
            len: 0,
        }
    }
    fn one(s: Segment) -> Segments {
        let mut out = Segments::new();
        out.push(s);
        out
    }
    fn push(&mut self, s: Segment) {
        self.items[self.len as usize] = s;
        self.len += 1;
    }
}

impl std::ops::Deref for Segments {
    type Target = [Segment];
    fn deref(&self) -> &[Segment] {
        &self.items[..self.len as usize]
    }
}

/// The segments of a command, in file order.
pub(crate) fn segments(p: PlanInput) -> Segments {
    let end = p.offset + p.len;
    let seg = |kind, s, e| Segment {
        kind,
        file_start: s,
        file_end: e,
    };
    if p.len == 0 {
        return Segments::new();
    }
    if !p.direct {
        return Segments::one(seg(SegKind::Buffered, p.offset, end));
    }
    let b = p.block;
    let a0 = round_up(p.offset, b);
    let a1 = round_down(end, b);
    let unaligned = if p.write {
        SegKind::Buffered
    } else {
        SegKind::BounceRead
    };
    if a0 >= a1 {
        return Segments::one(seg(unaligned, p.offset, end));
    }
    let mid_addr = p.mem_addr as u64 + (a0 - p.offset);
    let co_aligned = mid_addr % p.mem_align.max(1) == 0;
    let middle = match (co_aligned, p.write) {
        (true, _) => SegKind::Direct,
        (false, false) => SegKind::BounceRead,
        (false, true) => SegKind::BounceWrite,
    };
    let mut out = Segments::new();
    if p.offset < a0 {
        out.push(seg(unaligned, p.offset, a0));
    }
    out.push(seg(middle, a0, a1));
    if a1 < end {
        out.push(seg(unaligned, a1, end));
    }
    // A bounce read of the whole command is simpler and as fast when nothing is direct.
    if out.iter().all(|s| s.kind == SegKind::BounceRead) {
        return Segments::one(seg(SegKind::BounceRead, p.offset, end));
    }
    out
}

/// Cuts the next task off the front of `seg`, starting at `cursor`.
///
/// `task_size` bounds user-memory tasks; `bounce_size` bounds the I/O of bounce tasks (it must be at
/// least four blocks).
pub(crate) fn next_task(
    seg: &Segment,
    cursor: u64,
    block: u64,
    task_size: usize,
    bounce_size: usize,
) -> TaskPlan {
    debug_assert!(cursor < seg.file_end);
    let remaining = seg.file_end - cursor;
    match seg.kind {
        SegKind::Direct | SegKind::Buffered => {
            let mut len = remaining.min(task_size as u64);
            if seg.kind == SegKind::Direct && len < remaining {
                // Keep every direct task aligned (task_size is a multiple of the block, but be safe).
                len = round_down(len, block).max(block);
            }
            TaskPlan {
                kind: seg.kind,
                file_start: cursor,
                len: len as usize,
                io_start: cursor,
                io_len: len as usize,
            }
        }
        SegKind::BounceWrite => {
            let len = remaining.min(round_down(bounce_size as u64, block));
            TaskPlan {
                kind: seg.kind,
                file_start: cursor,
                len: len as usize,
                io_start: cursor,
                io_len: len as usize,
            }
        }
        SegKind::BounceRead => {
            let io_start = round_down(cursor, block);
            // The I/O must fit in the bounce buffer after rounding both ends out to blocks.
            let max_io = round_down(bounce_size as u64, block);
            let io_end = round_up(seg.file_end, block).min(io_start + max_io);
            let len = (io_end.min(seg.file_end)) - cursor;
            TaskPlan {
                kind: seg.kind,
                file_start: cursor,
                len: len as usize,
                io_start,
                io_len: (io_end - io_start) as usize,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn input(write: bool, direct: bool, mem_addr: usize, offset: u64, len: u64) -> PlanInput {
        PlanInput {
            write,
            direct,
            block: 4096,
            mem_align: 512,
            mem_addr,
            offset,
            len,
        }
    }

    #[test]
    fn aligned_read_is_one_direct_segment() {
        let s = segments(input(false, true, 0x10000, 8192, 1 << 20));
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].kind, SegKind::Direct);
    }

    #[test]
    fn unaligned_read_has_bounced_head_and_tail() {
        let s = segments(input(false, true, 0x10000 - 100, 4096 - 100, 10000));
        let kinds: Vec<_> = s.iter().map(|s| s.kind).collect();
        assert_eq!(
            kinds,
            [SegKind::BounceRead, SegKind::Direct, SegKind::BounceRead]
        );
    }

    #[test]
    fn unaligned_write_has_buffered_head_and_tail() {
        let s = segments(input(true, true, 0x10000 - 100, 4096 - 100, 10000));
        let kinds: Vec<_> = s.iter().map(|s| s.kind).collect();
        assert_eq!(
            kinds,
            [SegKind::Buffered, SegKind::Direct, SegKind::Buffered]
        );
        let s = segments(input(true, true, 0x10001, 4096 - 100, 10000));
        assert_eq!(s[1].kind, SegKind::BounceWrite, "memory not co-aligned");
    }

    proptest! {
        /// Tasks tile the command exactly, every direct I/O is aligned, and every bounce I/O fits.
        #[test]
        fn tasks_tile_and_align(write: bool, direct: bool, mem in 0usize..8192, offset in 0u64..20000,
                                len in 0u64..40000, task_kb in 1usize..8) {
            let task_size = task_kb * 4096;
            let bounce = 4 * 4096;
            let p = input(write, direct, 0x100000 + mem, offset, len);
            let mut next = offset;
            for &seg in segments(p).iter() {
                prop_assert_eq!(seg.file_start, next);
                let mut c = seg.file_start;
                while c < seg.file_end {
                    let t = next_task(&seg, c, 4096, task_size, bounce);
                    prop_assert_eq!(t.file_start, c);
                    prop_assert!(t.len > 0);
                    match t.kind {
                        SegKind::Direct | SegKind::BounceWrite | SegKind::BounceRead
                            if t.kind != SegKind::Buffered => {
                            prop_assert_eq!(t.io_start % 4096, 0);
                            prop_assert_eq!(t.io_len % 4096, 0);
                        }
                        _ => {}
                    }
                    if matches!(t.kind, SegKind::BounceRead | SegKind::BounceWrite) {
                        prop_assert!(t.io_len <= bounce);
                        prop_assert!(t.io_start <= t.file_start);
                        prop_assert!(t.file_start + t.len as u64 <= t.io_start + t.io_len as u64);
                    }
                    c += t.len as u64;
                }
                prop_assert_eq!(c, seg.file_end);
                next = seg.file_end;
            }
            prop_assert_eq!(next, offset + len);
        }
    }
}
