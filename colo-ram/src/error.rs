//! The crate's error type.

/// Everything that can go wrong in colo-ram. Bad input from the peer (a page address, a length) is an error
/// value here, never a panic or an out-of-bounds write.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RamError {
    /// A guest physical address is not page aligned.
    #[error("guest address {gpa:#x} is not aligned to the {page_size}-byte page size")]
    Misaligned {
        /// The offending guest physical address.
        gpa: u64,
        /// The page size it must be a multiple of.
        page_size: usize,
    },
    /// A page (or run of pages) lies outside guest RAM, wholly or partly.
    #[error("guest range {gpa:#x}+{len:#x} is not inside guest RAM")]
    OutOfRange {
        /// First guest physical address of the range.
        gpa: u64,
        /// Length of the range in bytes.
        len: u64,
    },
    /// Page data whose length is not a whole number of pages.
    #[error("page data at {gpa:#x} is {len} bytes, not a multiple of the {page_size}-byte page size")]
    ShortPage {
        /// Guest physical address of the data.
        gpa: u64,
        /// Length that was received.
        len: usize,
        /// The page size.
        page_size: usize,
    },
    /// A bitmap page index past the end of the bitmap.
    #[error("page index {page} is past the end of a {pages}-page bitmap")]
    PageIndex {
        /// The offending page index.
        page: usize,
        /// Number of pages in the bitmap.
        pages: usize,
    },
    /// A bitmap (from KVM, vm-memory or a peer) of the wrong size for its region.
    #[error("dirty bitmap has {found_words} words, expected {expected_words}")]
    BitmapSize {
        /// Words the region needs.
        expected_words: usize,
        /// Words that were supplied.
        found_words: usize,
    },
    /// Two memory layouts that must match do not (cache vs guest memory, log vs layout).
    #[error("memory layout mismatch: {0}")]
    LayoutMismatch(String),
    /// Guest memory that cannot be tracked: a region not a whole number of pages, or no host mapping.
    #[error("unsupported guest memory region at {gpa:#x} (len {len:#x}): {reason}")]
    UnsupportedRegion {
        /// Region start.
        gpa: u64,
        /// Region length.
        len: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Allocating the RAM cache failed.
    #[error("cannot allocate the RAM cache: {0}")]
    CacheAlloc(String),
    /// A KVM ioctl failed.
    #[cfg(feature = "kvm")]
    #[error("KVM {op} on slot {slot} failed: {source}")]
    Kvm {
        /// The operation (`KVM_GET_DIRTY_LOG`, `KVM_CLEAR_DIRTY_LOG`, ...).
        op: &'static str,
        /// The memory slot.
        slot: u32,
        /// The underlying error.
        source: kvm_ioctls::Error,
    },
}
