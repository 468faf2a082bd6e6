//! Memory the engine moves bytes into and out of: page-aligned owned buffers ([`AlignedBuf`]), a pool of
//! fixed-size buffers that are recycled rather than freed ([`BufferPool`]), and a [`MemoryBudget`] that
//! pools and staging buffers are charged against. A caller's own memory (a Python buffer, a numpy
//! array, a mapping) can be lent to the engine as an [`AlignedBuf`] too, without a copy: see
//! [`AlignedBuf::from_raw_parts`] for the contract.
//!
//! Why recycle: freeing a large buffer unmaps its pages, and every unmap of pages another thread touched
//! costs a TLB shootdown (finding 595). A pool allocates once and hands the same pages out again, so the
//! hot path never maps or unmaps. Pool buffers can also be registered with io_uring as fixed buffers,
//! which saves the kernel pinning pages on every I/O.
//!
//! This module never does I/O, and never grows past a budget: a caller that would exceed one waits for
//! memory to be returned or, if it asked not to wait, gets [`ErrorKind::WouldBlock`].

use std::alloc::{self, Layout};
use std::any::Any;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use crate::error::{Error, ErrorKind, Result};

/// A transparent huge page on x86-64 and most aarch64 kernels: slabs this large are aligned to it and
/// advised to use huge pages (see [`AlignedBuf::carve`]).
const HUGE_PAGE: usize = 2 << 20;

/// Alignment of buffers handed to direct I/O. 4 KiB is the x86-64 and common NVMe page; 16 KiB is the
/// Apple Silicon page, which zero-copy device registration requires there (finding 223).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PageSize {
    #[default]
    K4,
    K16,
}

impl PageSize {
    pub const fn bytes(self) -> usize {
        match self {
            PageSize::K4 => 4096,
            PageSize::K16 => 16384,
        }
    }
}

/// Whether a caller that would exceed a budget waits or fails at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Block until memory is returned (optionally at most this long; `None` = no limit).
    Yes(Option<Duration>),
    /// Fail with [`ErrorKind::WouldBlock`] instead of waiting.
    No,
}

#[derive(Debug)]
struct BudgetInner {
    limit_bytes: u64,
    used_bytes: Mutex<u64>,
    freed: Condvar,
}

/// A limit on bytes of buffer memory. Cloning shares the same budget.
#[derive(Debug, Clone)]
pub struct MemoryBudget(Arc<BudgetInner>);

/// Bytes held against a [`MemoryBudget`]; returned when dropped.
#[derive(Debug)]
pub struct BudgetCharge {
    budget: MemoryBudget,
    bytes: u64,
}

impl MemoryBudget {
    pub fn new(limit_bytes: u64) -> MemoryBudget {
        MemoryBudget(Arc::new(BudgetInner {
            limit_bytes,
            used_bytes: Mutex::new(0),
            freed: Condvar::new(),
        }))
    }

    /// A budget that never refuses (still counts usage).
    pub fn unlimited() -> MemoryBudget {
        MemoryBudget::new(u64::MAX)
    }

    pub fn limit_bytes(&self) -> u64 {
        self.0.limit_bytes
    }

    pub fn used_bytes(&self) -> u64 {
        *self.0.used_bytes.lock()
    }

    /// Takes `bytes` from the budget, waiting or failing as `wait` says.
    pub fn acquire(&self, bytes: u64, wait: Wait) -> Result<BudgetCharge> {
        if bytes > self.0.limit_bytes {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "a request for {bytes} bytes can never fit a memory budget of {} bytes",
                    self.0.limit_bytes
                ),
            ));
        }
        let mut used = self.0.used_bytes.lock();
        let deadline = match wait {
            Wait::Yes(Some(d)) => Some(std::time::Instant::now() + d),
            _ => None,
        };
        while *used + bytes > self.0.limit_bytes {
            let limit = self.0.limit_bytes;
            let exhausted = |used: u64| {
                Error::new(
                    ErrorKind::WouldBlock,
                    format!(
                        "memory budget exhausted: {bytes} bytes wanted, {used} of {limit} in use"
                    ),
                )
            };
            match (wait, deadline) {
                (Wait::No, _) => return Err(exhausted(*used)),
                (Wait::Yes(_), Some(d)) => {
                    if self.0.freed.wait_until(&mut used, d).timed_out()
                        && *used + bytes > self.0.limit_bytes
                    {
                        return Err(exhausted(*used));
                    }
                }
                (Wait::Yes(_), None) => self.0.freed.wait(&mut used),
            }
        }
        *used += bytes;
        Ok(BudgetCharge {
            budget: self.clone(),
            bytes,
        })
    }
}

impl Drop for BudgetCharge {
    fn drop(&mut self) {
        let mut used = self.budget.0.used_bytes.lock();
        *used -= self.bytes;
        self.budget.0.freed.notify_all();
    }
}

/// An owned, zero-initialised, aligned heap buffer. Its address never changes while it lives, so the
/// engine can hand it to the kernel; moving the `AlignedBuf` value moves only the handle.
///
/// It can also stand for memory it does not own, lent by a caller ([`AlignedBuf::from_raw_parts`]): such
/// a buffer is never freed or recycled here, has whatever alignment its address gives, and cannot grow
/// past the length it was lent with.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
    /// Who frees the memory: the buffer itself, or a slab it was carved from.
    owner: Owner,
}

enum Owner {
    /// Allocated alone with `layout`; freed on drop; charged to a budget if any (held for its Drop).
    Alone(#[allow(dead_code)] Option<BudgetCharge>),
    /// A piece of a slab shared by many buffers; the slab is freed when its last piece is.
    Slab(#[allow(dead_code)] Arc<Slab>),
    /// Memory lent by a caller ([`AlignedBuf::from_raw_parts`]): never freed here; the keep-alive is
    /// dropped (once) with the buffer.
    Foreign(#[allow(dead_code)] Box<dyn Any + Send>),
}

/// One allocation that [`AlignedBuf::carve`] cut into many buffers.
struct Slab {
    ptr: NonNull<u8>,
    layout: Layout,
    _charge: Option<BudgetCharge>,
}

// SAFETY: the slab's memory is only reached through the buffers carved from it, each of which owns a
// disjoint piece.
unsafe impl Send for Slab {}
// SAFETY: as above; the slab itself is never read or written through a shared reference.
unsafe impl Sync for Slab {}

impl Drop for Slab {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in carve().
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

// SAFETY: AlignedBuf uniquely owns its allocation (or its piece of a slab), like Vec<u8>; lent memory
// is exclusively the buffer's by `from_raw_parts`'s contract, and its keep-alive is `Send`.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only allow reads, like &Vec<u8>. A keep-alive is never reached through a
// shared reference (it is only dropped, with the buffer), so it need not be `Sync`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes aligned to `align` (a power of two, at least 512).
    pub fn new(len: usize, align: usize) -> Result<AlignedBuf> {
        Self::alloc(len, align, None)
    }

    /// A zeroed buffer aligned to a page of `page`.
    pub fn with_page(len: usize, page: PageSize) -> Result<AlignedBuf> {
        Self::new(len, page.bytes())
    }

    /// Like [`AlignedBuf::new`], charged to `budget`.
    pub fn new_in(
        budget: &MemoryBudget,
        len: usize,
        align: usize,
        wait: Wait,
    ) -> Result<AlignedBuf> {
        let charge = budget.acquire(len as u64, wait)?;
        Self::alloc(len, align, Some(charge))
    }

    fn alloc(len: usize, align: usize, charge: Option<BudgetCharge>) -> Result<AlignedBuf> {
        if !align.is_power_of_two() || align < 512 {
            return Err(Error::invalid(format!(
                "buffer alignment {align} must be a power of two of at least 512"
            )));
        }
        // A zero-length buffer still gets one aligned block so that its pointer is valid and aligned.
        let size = len.max(1).next_multiple_of(align);
        let layout = Layout::from_size_align(size, align)
            .map_err(|_| Error::invalid(format!("buffer of {len} bytes is too large")))?;
        // SAFETY: layout has non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or_else(|| {
            Error::new(
                ErrorKind::WouldBlock,
                format!("out of memory allocating {size} bytes"),
            )
        })?;
        Ok(AlignedBuf {
            ptr,
            len,
            layout,
            owner: Owner::Alone(charge),
        })
    }

    /// Lends `len` bytes of caller memory at `ptr` to gpu-io as a buffer, without copying: loads write
    /// straight into it, stores read straight from it. `keep_alive` is whatever keeps the memory
    /// valid (a Python buffer export, an `Arc` of the owning allocation, a mapping); it is dropped
    /// exactly once, when the buffer is — and the engine drops a command's buffer only after the
    /// kernel and its worker threads are done with it: when the caller drops what the command
    /// buffer handed back ([`Finished`](crate::Finished)), or with the command buffer's shared state
    /// if the [`Completion`](crate::Completion) was dropped first — on success, error, cancellation
    /// and engine shutdown alike (the engine drains in-flight I/O before it lets a buffer go).
    ///
    /// The buffer never frees the memory and never hands it to a [`BufferPool`]. Its
    /// [`capacity`](Self::capacity) is `len` ([`set_len`](Self::set_len) can shorten it and restore
    /// it, never grow it); [`align`](Self::align) is the largest power of two (up to 2 MiB) dividing
    /// the address; [`prefault`](Self::prefault) does nothing; [`IoBuffer::into_owned`] returns it
    /// as is (still lent). The engine transfers only the byte range a command names, bouncing the
    /// parts that direct I/O cannot reach at this address (see `queue::plan`), so any address and
    /// length work; an address, length and file offset aligned for the file's direct I/O
    /// ([`File::align`](crate::File::align)) go to the device with no copy at all.
    ///
    /// Fails only for a `len` no allocation can have (more than `isize::MAX` bytes).
    ///
    /// # Safety
    ///
    /// Until the returned buffer (or the [`IoBuffer`] holding it) is dropped:
    /// - `ptr..ptr + len` must be valid for reads and writes, and hold initialised bytes (any
    ///   values; memory from another language's allocator, `mmap` or `malloc`, counts as such). A
    ///   buffer only ever given to `store` commands need only be valid for reads (the engine never
    ///   writes a store's buffer), provided its holder does not write it either;
    /// - nothing else may read or write that memory — the engine's threads and the kernel may be
    ///   writing it at any moment — nor free, unmap or resize it (holding `keep_alive` is one way to
    ///   guarantee the last);
    /// - it must not overlap another live buffer's memory that gpu-io may write.
    ///
    /// Dropping `keep_alive` must be safe on any thread (it is `Send`); it may run on the engine thread
    /// when the completion was dropped without waiting, so it should not block on locks the engine's
    /// users hold while they wait for it (a Python keep-alive should not need the GIL there: see
    /// `crates/gpuio-python/src/file.rs`).
    pub unsafe fn from_raw_parts(
        ptr: NonNull<u8>,
        len: usize,
        keep_alive: Box<dyn Any + Send>,
    ) -> Result<AlignedBuf> {
        let align = 1usize << (ptr.as_ptr() as usize).trailing_zeros().min(21);
        let layout = Layout::from_size_align(len, align)
            .map_err(|_| Error::invalid(format!("a lent buffer of {len} bytes is too large")))?;
        Ok(AlignedBuf {
            ptr,
            len,
            layout,
            owner: Owner::Foreign(keep_alive),
        })
    }

    /// Whether the memory is lent by a caller ([`from_raw_parts`](Self::from_raw_parts)) rather than
    /// gpu-io's own.
    pub fn is_foreign(&self) -> bool {
        matches!(self.owner, Owner::Foreign(_))
    }

    /// `count` zeroed buffers of `len` bytes aligned to `align`, cut from one allocation charged to
    /// `budget`. Many small aligned allocations cost far more than their size (an allocator pads each
    /// 4 KiB-aligned 4 KiB block to two pages); one slab costs what it holds. The memory returns to the
    /// system when the last of the buffers is dropped.
    pub fn carve(
        budget: &MemoryBudget,
        count: usize,
        len: usize,
        align: usize,
        wait: Wait,
    ) -> Result<Vec<AlignedBuf>> {
        if !align.is_power_of_two() || align < 512 {
            return Err(Error::invalid(format!(
                "buffer alignment {align} must be a power of two of at least 512"
            )));
        }
        if count == 0 {
            return Ok(Vec::new());
        }
        let stride = len.max(1).next_multiple_of(align);
        let total = stride.checked_mul(count).ok_or_else(|| {
            Error::invalid(format!("{count} buffers of {len} bytes are too large"))
        })?;
        let charge = budget.acquire(total as u64, wait)?;
        // A slab of at least one huge page is aligned to one and offered to transparent huge pages
        // before its first touch: faulting in 64 MiB of staging took 31 ms in 4 KiB pages and about
        // a third of that in 2 MiB pages on a 2-core Firecracker VM (the kind of machine the H200
        // runs were on), where the loader's set-up was 30-40 ms of every load (docs/BENCHMARKS.md,
        // "Issue 12 on an H200"). Where THP is off the advice is ignored and nothing changes.
        let huge = total >= HUGE_PAGE;
        let slab_align = if huge { align.max(HUGE_PAGE) } else { align };
        let layout = Layout::from_size_align(total, slab_align)
            .map_err(|_| Error::invalid(format!("{count} buffers of {len} bytes are too large")))?;
        let base = if huge {
            // SAFETY: layout has non-zero size.
            let p = NonNull::new(unsafe { alloc::alloc(layout) });
            if let Some(p) = p {
                // SAFETY: p..p+total is this allocation; the advice changes no contents. Its result
                // is ignored: it is advice.
                unsafe { libc::madvise(p.as_ptr().cast(), total, libc::MADV_HUGEPAGE) };
                // SAFETY: the whole allocation, zeroed as alloc_zeroed would (after the advice, so
                // the first touch takes huge pages).
                unsafe { std::ptr::write_bytes(p.as_ptr(), 0, total) };
            }
            p
        } else {
            // SAFETY: layout has non-zero size.
            NonNull::new(unsafe { alloc::alloc_zeroed(layout) })
        };
        let base = base.ok_or_else(|| {
            Error::new(
                ErrorKind::WouldBlock,
                format!("out of memory allocating {total} bytes"),
            )
        })?;
        let slab = Arc::new(Slab {
            ptr: base,
            layout,
            _charge: Some(charge),
        });
        let piece =
            Layout::from_size_align(stride, align).expect("a piece of a valid layout is valid");
        Ok((0..count)
            .map(|i| AlignedBuf {
                // SAFETY: i * stride < total, inside the slab's allocation.
                ptr: unsafe { NonNull::new_unchecked(base.as_ptr().add(i * stride)) },
                len,
                layout: piece,
                owner: Owner::Slab(slab.clone()),
            })
            .collect())
    }

    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Usable bytes: `len` rounded up to the alignment (a lent buffer: the length it was lent with).
    pub fn capacity(&self) -> usize {
        self.layout.size()
    }
    pub fn align(&self) -> usize {
        self.layout.align()
    }
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    /// Touches every page so that it is resident now rather than faulted in on first use (a pool's
    /// buffers are made once and reused: their page faults belong at creation, not on the hot path).
    pub fn prefault(&mut self) {
        if self.is_foreign() {
            // Not ours: its bytes are the caller's data, and its pages are the caller's business.
            return;
        }
        let base = self.ptr.as_ptr();
        for off in (0..self.capacity()).step_by(4096) {
            // SAFETY: off < capacity; writing the zero that is already there only forces the page in.
            unsafe { std::ptr::write_volatile(base.add(off), 0) };
        }
    }

    /// Changes the visible length, up to the capacity.
    pub fn set_len(&mut self, len: usize) -> Result<()> {
        if len > self.capacity() {
            return Err(Error::invalid(format!(
                "length {len} exceeds buffer capacity {}",
                self.capacity()
            )));
        }
        self.len = len;
        Ok(())
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for capacity() >= len initialised (zeroed, or lent initialised) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // A slab is freed with its last piece (Slab's Drop); lent memory is never freed here, and its
        // keep-alive is dropped with the `owner` field right after this.
        if let Owner::Alone(_) = self.owner {
            // SAFETY: allocated alone with this layout in alloc().
            unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
        }
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("align", &self.layout.align())
            .field("foreign", &self.is_foreign())
            .finish()
    }
}

/// How a pool's buffers were registered with an io_uring instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registration {
    /// Not (yet) offered to an engine.
    None,
    /// Registered: buffer `i` is fixed buffer `base + i`.
    Fixed { base: u16 },
    /// Registration was refused; I/O uses the buffers unregistered. The reason says why.
    Refused(String),
}

struct PoolInner {
    buf_size: usize,
    count: usize,
    align: usize,
    free: Mutex<Vec<(u16, AlignedBuf)>>,
    returned: Condvar,
    /// Base fixed-buffer index when registered; `u32::MAX` when not registered.
    fixed_base: AtomicU32,
    registration: Mutex<Registration>,
    /// Address and length of every buffer, for registration.
    regions: Vec<(usize, usize)>,
}

/// A fixed set of equal-size aligned buffers, allocated once and recycled. Cloning shares the pool.
#[derive(Clone)]
pub struct BufferPool(Arc<PoolInner>);

impl fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufferPool")
            .field("buf_size", &self.0.buf_size)
            .field("count", &self.0.count)
            .field("available", &self.available())
            .field("registration", &*self.0.registration.lock())
            .finish()
    }
}

impl BufferPool {
    /// `count` buffers of `buf_size` bytes aligned to `align`, charged to `budget` up front.
    pub fn new(
        budget: &MemoryBudget,
        buf_size: usize,
        count: usize,
        align: usize,
        wait: Wait,
    ) -> Result<BufferPool> {
        if buf_size == 0 || count == 0 {
            return Err(Error::invalid(format!(
                "buffer pool needs a non-zero size and count (got {buf_size} x {count})"
            )));
        }
        if count > u16::MAX as usize {
            return Err(Error::invalid(format!(
                "buffer pool of {count} buffers exceeds the limit of {}",
                u16::MAX
            )));
        }
        let mut free = Vec::with_capacity(count);
        let mut regions = Vec::with_capacity(count);
        for (i, mut buf) in AlignedBuf::carve(budget, count, buf_size, align, wait)?
            .into_iter()
            .enumerate()
        {
            buf.prefault();
            regions.push((buf.as_mut_ptr() as usize, buf.capacity()));
            free.push((i as u16, buf));
        }
        free.reverse();
        Ok(BufferPool(Arc::new(PoolInner {
            buf_size,
            count,
            align,
            free: Mutex::new(free),
            returned: Condvar::new(),
            fixed_base: AtomicU32::new(u32::MAX),
            registration: Mutex::new(Registration::None),
            regions,
        })))
    }

    pub fn buf_size(&self) -> usize {
        self.0.buf_size
    }
    pub fn count(&self) -> usize {
        self.0.count
    }
    pub fn align(&self) -> usize {
        self.0.align
    }
    pub fn available(&self) -> usize {
        self.0.free.lock().len()
    }
    pub fn registration(&self) -> Registration {
        self.0.registration.lock().clone()
    }

    /// Address and length of each buffer, in index order (for registering them with a ring).
    pub(crate) fn regions(&self) -> &[(usize, usize)] {
        &self.0.regions
    }

    pub(crate) fn set_registration(&self, reg: Registration) {
        let base = match reg {
            Registration::Fixed { base } => base as u32,
            _ => u32::MAX,
        };
        self.0.fixed_base.store(base, Ordering::Release);
        *self.0.registration.lock() = reg;
    }

    /// Takes a buffer, waiting for one to be returned if all are out.
    pub fn get(&self) -> PooledBuf {
        let mut free = self.0.free.lock();
        loop {
            if let Some(b) = self.pop(&mut free) {
                return b;
            }
            self.0.returned.wait(&mut free);
        }
    }

    /// Takes a buffer, waiting at most `timeout` for one to be returned; then fails with
    /// [`ErrorKind::WouldBlock`].
    pub fn get_timeout(&self, timeout: std::time::Duration) -> Result<PooledBuf> {
        let deadline = std::time::Instant::now() + timeout;
        let mut free = self.0.free.lock();
        loop {
            if let Some(b) = self.pop(&mut free) {
                return Ok(b);
            }
            if self.0.returned.wait_until(&mut free, deadline).timed_out() && free.is_empty() {
                return Err(Error::new(
                    ErrorKind::WouldBlock,
                    format!(
                        "all {} pool buffers stayed in use for {timeout:?}",
                        self.0.count
                    ),
                ));
            }
        }
    }

    /// Takes a buffer, or fails with [`ErrorKind::WouldBlock`] if all are out.
    pub fn try_get(&self) -> Result<PooledBuf> {
        let popped = self.pop(&mut self.0.free.lock());
        popped.ok_or_else(|| {
            Error::new(
                ErrorKind::WouldBlock,
                format!("all {} pool buffers are in use", self.0.count),
            )
        })
    }

    fn pop(&self, free: &mut Vec<(u16, AlignedBuf)>) -> Option<PooledBuf> {
        free.pop().map(|(index, buf)| PooledBuf {
            buf: Some(buf),
            index,
            pool: self.clone(),
        })
    }
}

/// A buffer borrowed from a [`BufferPool`]; goes back to the pool when dropped.
pub struct PooledBuf {
    buf: Option<AlignedBuf>,
    index: u16,
    pool: BufferPool,
}

impl PooledBuf {
    /// The io_uring fixed-buffer index of this buffer, if its pool is registered.
    pub fn fixed_index(&self) -> Option<u16> {
        let base = self.pool.0.fixed_base.load(Ordering::Acquire);
        (base != u32::MAX).then(|| (base + self.index as u32) as u16)
    }

    /// Changes the visible length, up to the pool's buffer size.
    pub fn set_len(&mut self, len: usize) -> Result<()> {
        self.buf_mut().set_len(len)
    }

    /// Whether this buffer came from `pool` (its fixed index means something only on the ring that
    /// registered that pool).
    pub fn is_from(&self, pool: &BufferPool) -> bool {
        Arc::ptr_eq(&self.pool.0, &pool.0)
    }

    fn buf_mut(&mut self) -> &mut AlignedBuf {
        self.buf.as_mut().expect("pooled buffer present until drop")
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.deref().as_ptr()
    }
}

impl Deref for PooledBuf {
    type Target = AlignedBuf;
    fn deref(&self) -> &AlignedBuf {
        self.buf.as_ref().expect("pooled buffer present until drop")
    }
}

impl DerefMut for PooledBuf {
    fn deref_mut(&mut self) -> &mut AlignedBuf {
        self.buf_mut()
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if let Some(mut buf) = self.buf.take() {
            // Reset a shortened buffer; buf_size never exceeds the capacity, so this cannot fail.
            let _ = buf.set_len(self.pool.0.buf_size);
            self.pool.0.free.lock().push((self.index, buf));
            self.pool.0.returned.notify_one();
        }
    }
}

impl fmt::Debug for PooledBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PooledBuf")
            .field("index", &self.index)
            .field("len", &self.len())
            .field("fixed", &self.fixed_index())
            .finish()
    }
}

/// A buffer a command reads into or writes from: owned by the command from `load`/`store` until the
/// command buffer completes, then handed back.
#[derive(Debug)]
pub enum IoBuffer {
    Owned(AlignedBuf),
    Pooled(PooledBuf),
}

impl IoBuffer {
    pub fn len(&self) -> usize {
        self.as_aligned().len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn fixed_index(&self) -> Option<u16> {
        match self {
            IoBuffer::Owned(_) => None,
            IoBuffer::Pooled(p) => p.fixed_index(),
        }
    }
    /// The fixed index to use on a ring that registered exactly `pools`: a buffer of a pool
    /// registered with another ring (another engine, a `LocalQueue`) has an index that means
    /// nothing there (the kernel fails such a transfer with EFAULT), so it goes unregistered.
    pub(crate) fn fixed_index_among(&self, pools: &[BufferPool]) -> Option<u16> {
        match self {
            IoBuffer::Pooled(p) if pools.iter().any(|q| p.is_from(q)) => p.fixed_index(),
            _ => None,
        }
    }
    pub fn as_aligned(&self) -> &AlignedBuf {
        match self {
            IoBuffer::Owned(b) => b,
            IoBuffer::Pooled(p) => p,
        }
    }
    pub fn as_aligned_mut(&mut self) -> &mut AlignedBuf {
        match self {
            IoBuffer::Owned(b) => b,
            IoBuffer::Pooled(p) => p,
        }
    }
    /// Whether the memory is lent by a caller ([`AlignedBuf::from_raw_parts`]).
    pub fn is_foreign(&self) -> bool {
        self.as_aligned().is_foreign()
    }
    /// Unwraps an owned buffer (a pooled one is copied into a fresh owned buffer; a lent one is
    /// returned as is, still lent).
    pub fn into_owned(self) -> Result<AlignedBuf> {
        match self {
            IoBuffer::Owned(b) => Ok(b),
            IoBuffer::Pooled(p) => {
                let mut b = AlignedBuf::new(p.len(), p.align())?;
                b.copy_from_slice(&p);
                Ok(b)
            }
        }
    }
}

impl Deref for IoBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_aligned()
    }
}

impl DerefMut for IoBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_aligned_mut()
    }
}

impl From<AlignedBuf> for IoBuffer {
    fn from(b: AlignedBuf) -> IoBuffer {
        IoBuffer::Owned(b)
    }
}

impl From<PooledBuf> for IoBuffer {
    fn from(b: PooledBuf) -> IoBuffer {
        IoBuffer::Pooled(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        for page in [PageSize::K4, PageSize::K16] {
            let b = AlignedBuf::with_page(10_000, page).unwrap();
            assert_eq!(b.as_ptr() as usize % page.bytes(), 0);
            assert_eq!(b.len(), 10_000);
            assert!(b.iter().all(|&x| x == 0));
        }
        assert_eq!(
            AlignedBuf::new(10, 3000).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
    }

    #[test]
    fn pool_recycles_the_same_pages() {
        let pool = BufferPool::new(&MemoryBudget::unlimited(), 8192, 2, 4096, Wait::No).unwrap();
        let a = pool.get();
        let addr = a.as_ptr() as usize;
        drop(a);
        let b = pool.get();
        assert_eq!(
            b.as_ptr() as usize,
            addr,
            "a returned buffer is handed out again"
        );
        let _c = pool.get();
        assert_eq!(pool.try_get().unwrap_err().kind(), ErrorKind::WouldBlock);
        let e = pool.get_timeout(Duration::from_millis(20)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::WouldBlock);
        // A buffer returned by another thread ends the wait.
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            drop(b);
        });
        let d = pool.get_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(d.as_ptr() as usize, addr);
        t.join().unwrap();
    }

    #[test]
    fn budget_refuses_or_waits() {
        let budget = MemoryBudget::new(16384);
        let a = AlignedBuf::new_in(&budget, 12288, 4096, Wait::No).unwrap();
        let err = AlignedBuf::new_in(&budget, 8192, 4096, Wait::No).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::WouldBlock);
        let timed = AlignedBuf::new_in(
            &budget,
            8192,
            4096,
            Wait::Yes(Some(Duration::from_millis(20))),
        );
        assert_eq!(timed.unwrap_err().kind(), ErrorKind::WouldBlock);
        let b2 = budget.clone();
        let t = std::thread::spawn(move || {
            AlignedBuf::new_in(&b2, 8192, 4096, Wait::Yes(None)).map(|b| b.len())
        });
        std::thread::sleep(Duration::from_millis(20));
        drop(a);
        assert_eq!(t.join().unwrap().unwrap(), 8192);
        assert_eq!(budget.used_bytes(), 0);
        assert_eq!(
            budget.acquire(1 << 20, Wait::Yes(None)).unwrap_err().kind(),
            ErrorKind::InvalidInput,
            "a request larger than the whole budget fails instead of waiting forever"
        );
    }

    #[test]
    fn carved_buffers_are_disjoint_aligned_and_freed_together() {
        let budget = MemoryBudget::new(1 << 20);
        let mut bufs = AlignedBuf::carve(&budget, 3, 5000, 4096, Wait::No).unwrap();
        assert_eq!(
            budget.used_bytes(),
            3 * 8192,
            "one charge for the whole slab"
        );
        for (i, b) in bufs.iter_mut().enumerate() {
            assert_eq!(b.as_ptr() as usize % 4096, 0);
            assert_eq!(b.len(), 5000);
            assert!(b.iter().all(|&x| x == 0));
            b.fill(i as u8 + 1);
        }
        for (i, b) in bufs.iter().enumerate() {
            assert!(b.iter().all(|&x| x == i as u8 + 1), "pieces do not overlap");
        }
        let last = bufs.pop().unwrap();
        drop(bufs);
        assert_eq!(
            budget.used_bytes(),
            3 * 8192,
            "still held by the last piece"
        );
        drop(last);
        assert_eq!(budget.used_bytes(), 0);
    }

    #[test]
    fn pool_charges_budget() {
        let budget = MemoryBudget::new(3 * 4096);
        let err = BufferPool::new(&budget, 4096, 4, 4096, Wait::No).unwrap_err();
        assert_eq!(
            err.kind(),
            ErrorKind::InvalidInput,
            "a pool larger than the budget can never fit"
        );
        assert_eq!(budget.used_bytes(), 0);
        let pool = BufferPool::new(&budget, 4096, 3, 4096, Wait::No).unwrap();
        assert_eq!(budget.used_bytes(), 3 * 4096);
        let err = BufferPool::new(&budget, 4096, 1, 4096, Wait::No).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::WouldBlock, "the budget is in use");
        assert_eq!(budget.used_bytes(), 3 * 4096, "a failed pool takes nothing");
        drop(pool);
        assert_eq!(budget.used_bytes(), 0);
    }

    /// A keep-alive that counts its drops.
    struct Counted(Arc<std::sync::atomic::AtomicUsize>);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// `mem` lent as a buffer, and the counter of its keep-alive's drops.
    fn lent(mem: &mut [u8]) -> (AlignedBuf, Arc<std::sync::atomic::AtomicUsize>) {
        let drops = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let ptr = NonNull::new(mem.as_mut_ptr()).unwrap();
        // SAFETY: the tests touch `mem` only after the buffer is dropped (checked by `drops`).
        let buf =
            unsafe { AlignedBuf::from_raw_parts(ptr, mem.len(), Box::new(Counted(drops.clone()))) }
                .unwrap();
        (buf, drops)
    }

    fn drops_of(c: &std::sync::atomic::AtomicUsize) -> usize {
        c.load(Ordering::SeqCst)
    }

    #[test]
    fn lent_memory_is_never_freed_grown_or_cleared() {
        let mut mem = vec![7u8; 10_000];
        let at = mem.as_ptr() as usize;
        let (mut buf, drops) = lent(&mut mem[3..]);
        assert!(buf.is_foreign());
        assert_eq!((buf.len(), buf.capacity()), (9_997, 9_997));
        assert_eq!(buf.as_ptr() as usize, at + 3);
        assert_eq!(buf.align(), 1 << (at + 3).trailing_zeros().min(21));
        buf.prefault();
        assert!(
            buf.iter().all(|&b| b == 7),
            "prefault must not write lent memory"
        );
        assert_eq!(
            buf.set_len(10_000).unwrap_err().kind(),
            ErrorKind::InvalidInput,
            "a lent buffer cannot grow past the memory lent"
        );
        buf.set_len(5).unwrap();
        buf.set_len(9_997).unwrap();
        buf[0] = 1;
        let io = IoBuffer::from(buf);
        assert!(io.is_foreign());
        let back = io.into_owned().unwrap();
        assert!(back.is_foreign(), "into_owned keeps the lent memory lent");
        assert_eq!(back.as_ptr() as usize, at + 3, "and does not copy it");
        assert_eq!(drops_of(&drops), 0);
        drop(back);
        assert_eq!(
            drops_of(&drops),
            1,
            "the keep-alive is dropped exactly once"
        );
        // Still ours, intact (a dealloc of foreign memory would have corrupted or crashed here).
        assert_eq!(mem[3], 1);
        assert!(mem[4..].iter().all(|&b| b == 7));
        mem.push(9);
    }

    /// A file of `len` known bytes, and an engine on the thread-pool backend (available everywhere).
    fn file_and_queue(
        dir: &std::path::Path,
        len: usize,
    ) -> (Vec<u8>, crate::File, crate::Engine, crate::IoQueue) {
        let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        let path = dir.join("data.bin");
        std::fs::write(&path, &data).unwrap();
        let file = crate::File::open(&path).unwrap();
        let engine = crate::Engine::new(crate::EngineConfig {
            backend: crate::BackendConfig {
                choice: crate::BackendChoice::Threads,
                ..crate::BackendConfig::default()
            },
            task_size_bytes: 64 << 10,
            ..crate::EngineConfig::default()
        })
        .unwrap();
        let queue = engine.queue(crate::QueueDesc::default()).unwrap();
        (data, file, engine, queue)
    }

    #[test]
    fn lent_buffer_keep_alive_dropped_once_on_success_and_error() {
        let dir = tempfile::tempdir().unwrap();
        let (data, file, _engine, queue) = file_and_queue(dir.path(), 300_000);
        // Success: the bytes land in the caller's memory.
        let mut mem = vec![0u8; 200_001];
        let (buf, drops) = lent(&mut mem);
        let mut cb = queue.command_buffer();
        let id = cb.load(&file, 1234, buf).unwrap();
        let mut done = cb.commit().unwrap().finish().unwrap();
        assert_eq!(done.bytes(id), 200_001);
        assert_eq!(
            drops_of(&drops),
            0,
            "held until the caller lets the buffer go"
        );
        let back = done.take_buffer(id).unwrap();
        assert!(back.is_foreign());
        drop((back, done));
        assert_eq!(drops_of(&drops), 1);
        assert!(
            mem == data[1234..1234 + 200_001],
            "bytes read into lent memory"
        );
        // Error: an exact load past the end of the file.
        let mut mem = vec![0u8; 8192];
        let (buf, drops) = lent(&mut mem);
        let mut cb = queue.command_buffer();
        cb.load(&file, 299_000, buf).unwrap();
        let (status, done) = cb.commit().unwrap().wait_parts();
        assert_eq!(
            status.first_error().map(|e| e.kind()),
            Some(ErrorKind::UnexpectedEof)
        );
        drop(done);
        assert_eq!(drops_of(&drops), 1, "released once after an error too");
        // A command that fails when recorded (a range outside the buffer) releases it at once.
        let mut mem = vec![0u8; 4096];
        let (buf, drops) = lent(&mut mem);
        let mut cb = queue.command_buffer();
        assert!(cb.load_range(&file, 0, buf, 4000, 200, true).is_err());
        assert_eq!(drops_of(&drops), 1);
    }

    #[test]
    fn lent_buffer_keep_alive_dropped_once_on_cancel_and_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let (data, file, engine, queue) = file_and_queue(dir.path(), 8 << 20);
        // Cancel: whether or not it wins the race, the buffer comes back once, after the I/O.
        let mut mem = vec![0u8; 8 << 20];
        let (buf, drops) = lent(&mut mem);
        let mut cb = queue.command_buffer();
        cb.load(&file, 0, buf).unwrap();
        let c = cb.commit().unwrap();
        c.try_cancel();
        let (status, done) = c.wait_parts();
        assert!(matches!(
            status,
            crate::Status::Cancelled | crate::Status::Complete
        ));
        assert_eq!(drops_of(&drops), 0);
        drop(done);
        assert_eq!(drops_of(&drops), 1);
        if status.is_complete() {
            assert!(mem == data);
        }
        // Completion, queue and engine dropped while the read is in flight: the engine drains the
        // read, then lets the buffer go; the last handle's drop joins the engine thread.
        let mut mem = vec![0u8; 8 << 20];
        let (buf, drops) = lent(&mut mem);
        let mut cb = queue.command_buffer();
        cb.load(&file, 0, buf).unwrap();
        let c = cb.commit().unwrap();
        drop((c, queue, engine));
        assert_eq!(drops_of(&drops), 1, "released by the engine at shutdown");
        assert!(mem == data, "the read drained before the memory was let go");
    }
}
