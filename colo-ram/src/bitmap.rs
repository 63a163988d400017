//! A compact page bitmap with word-at-a-time operations and fast run iteration.
//!
//! One bit per guest page, packed into `u64` words in the layout KVM's `KVM_GET_DIRTY_LOG` and vm-memory's
//! [`AtomicBitmap::get_and_reset`](vm_memory::bitmap::AtomicBitmap::get_and_reset) use: page `n` is bit
//! `n % 64` of word `n / 64`. Bits past [`DirtyBitmap::len`] are always clear.

use std::ops::Range;

use crate::error::RamError;

const WORD_BITS: usize = u64::BITS as usize;

/// A fixed-size bitmap, one bit per page.
///
/// Its size is fixed at construction: nothing a checkpoint does makes it grow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    bits: usize,
}

impl DirtyBitmap {
    /// A clear bitmap of `bits` pages.
    pub fn new(bits: usize) -> Self {
        DirtyBitmap {
            words: vec![0; bits.div_ceil(WORD_BITS)],
            bits,
        }
    }

    /// Takes ownership of `words` in KVM / vm-memory layout for a region of `bits` pages.
    ///
    /// `words` must hold exactly `bits.div_ceil(64)` words; stray bits past `bits` are dropped.
    pub fn from_words(words: Vec<u64>, bits: usize) -> Result<Self, RamError> {
        let expected = bits.div_ceil(WORD_BITS);
        if words.len() != expected {
            return Err(RamError::BitmapSize {
                expected_words: expected,
                found_words: words.len(),
            });
        }
        let mut map = DirtyBitmap { words, bits };
        map.mask_tail();
        Ok(map)
    }

    /// Takes (reads and resets) vm-memory's bitmap of one region: the pages the VMM wrote through vm-memory.
    pub fn take_atomic(map: &vm_memory::bitmap::AtomicBitmap) -> Self {
        let bits = map.len();
        let mut words = map.get_and_reset();
        // `AtomicBitmap` sizes its words as we do; never trust it blindly.
        words.resize(bits.div_ceil(WORD_BITS), 0);
        let mut out = DirtyBitmap { words, bits };
        out.mask_tail();
        out
    }

    /// Number of pages (bits) this bitmap covers.
    pub fn len(&self) -> usize {
        self.bits
    }

    /// Whether the bitmap covers no pages at all.
    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    /// The backing words, KVM layout.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    fn mask_tail(&mut self) {
        let tail = self.bits % WORD_BITS;
        if tail != 0
            && let Some(last) = self.words.last_mut()
        {
            *last &= (1u64 << tail) - 1;
        }
    }

    /// Marks page `page`. Returns an error if it lies past the end.
    pub fn set(&mut self, page: usize) -> Result<(), RamError> {
        self.check(page)?;
        self.words[page / WORD_BITS] |= 1 << (page % WORD_BITS);
        Ok(())
    }

    /// Clears page `page`. Returns an error if it lies past the end.
    pub fn clear(&mut self, page: usize) -> Result<(), RamError> {
        self.check(page)?;
        self.words[page / WORD_BITS] &= !(1 << (page % WORD_BITS));
        Ok(())
    }

    /// Whether page `page` is marked. Pages past the end are never marked.
    pub fn test(&self, page: usize) -> bool {
        page < self.bits && self.words[page / WORD_BITS] & (1 << (page % WORD_BITS)) != 0
    }

    fn check(&self, page: usize) -> Result<(), RamError> {
        if page < self.bits {
            Ok(())
        } else {
            Err(RamError::PageIndex {
                page,
                pages: self.bits,
            })
        }
    }

    /// Marks every page in `pages`, a whole word at a time in the middle.
    pub fn set_range(&mut self, pages: Range<usize>) -> Result<(), RamError> {
        self.apply_range(pages, true)
    }

    /// Clears every page in `pages`, a whole word at a time in the middle.
    pub fn clear_range(&mut self, pages: Range<usize>) -> Result<(), RamError> {
        self.apply_range(pages, false)
    }

    fn apply_range(&mut self, pages: Range<usize>, set: bool) -> Result<(), RamError> {
        if pages.start >= pages.end {
            return Ok(());
        }
        if pages.end > self.bits {
            return Err(RamError::PageIndex {
                page: pages.end - 1,
                pages: self.bits,
            });
        }
        let (first, last) = (pages.start / WORD_BITS, (pages.end - 1) / WORD_BITS);
        for w in first..=last {
            let lo = if w == first { pages.start % WORD_BITS } else { 0 };
            let hi = if w == last {
                (pages.end - 1) % WORD_BITS + 1
            } else {
                WORD_BITS
            };
            let mask = (u64::MAX >> (WORD_BITS - (hi - lo))) << lo;
            if set {
                self.words[w] |= mask;
            } else {
                self.words[w] &= !mask;
            }
        }
        Ok(())
    }

    /// Marks every page.
    pub fn set_all(&mut self) {
        self.words.fill(u64::MAX);
        self.mask_tail();
    }

    /// Clears every page (one `memset` of the words).
    pub fn clear_all(&mut self) {
        self.words.fill(0);
    }

    /// ORs `other` into `self`. Both must cover the same number of pages.
    pub fn union_with(&mut self, other: &DirtyBitmap) -> Result<(), RamError> {
        if other.bits != self.bits {
            return Err(RamError::BitmapSize {
                expected_words: self.words.len(),
                found_words: other.words.len(),
            });
        }
        self.or_words(&other.words)
    }

    /// ORs raw words (KVM `Vec<u64>` layout, or vm-memory's `AtomicBitmap::get_and_reset`) into `self`.
    ///
    /// `words` must be exactly as long as this bitmap's backing store. Stray bits past the end are dropped.
    pub fn or_words(&mut self, words: &[u64]) -> Result<(), RamError> {
        if words.len() != self.words.len() {
            return Err(RamError::BitmapSize {
                expected_words: self.words.len(),
                found_words: words.len(),
            });
        }
        for (dst, src) in self.words.iter_mut().zip(words) {
            *dst |= *src;
        }
        self.mask_tail();
        Ok(())
    }

    /// Number of marked pages.
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether no page is marked.
    pub fn is_clear(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Iterates over maximal runs of consecutive marked pages, in ascending order, as page index ranges.
    ///
    /// Clear words are skipped 64 pages at a time; inside a word, runs are found with `trailing_zeros`
    /// and `trailing_ones`, so the cost is one step per clear word plus one per run.
    pub fn runs(&self) -> Runs<'_> {
        self.runs_in_words(0..self.words.len())
    }

    /// Like [`runs`](Self::runs), restricted to the pages of words `words` (pages `64*start..64*end`).
    ///
    /// Used to split one bitmap between threads; a run that crosses a split point comes out in two parts.
    pub fn runs_in_words(&self, words: Range<usize>) -> Runs<'_> {
        let end = words.end.min(self.words.len());
        let start = words.start.min(end);
        Runs {
            words: &self.words[..end],
            next: start,
            cur: 0,
            base: start * WORD_BITS,
            pending: None,
        }
    }

    /// Iterates over the marked pages one by one, ascending.
    pub fn iter_pages(&self) -> impl Iterator<Item = usize> + '_ {
        self.runs().flatten()
    }

    /// Splits the words into at most `parts` consecutive ranges holding roughly equal numbers of marked pages.
    ///
    /// Empty ranges are left out; the ranges together cover every marked page.
    pub fn balanced_word_ranges(&self, parts: usize) -> Vec<Range<usize>> {
        let total = self.count();
        let parts = parts.max(1);
        let mut out = Vec::with_capacity(parts);
        if total == 0 {
            return out;
        }
        let share = total.div_ceil(parts);
        let (mut start, mut acc) = (0, 0);
        for (i, w) in self.words.iter().enumerate() {
            acc += w.count_ones() as usize;
            if acc >= share && out.len() + 1 < parts {
                out.push(start..i + 1);
                start = i + 1;
                acc = 0;
            }
        }
        if acc > 0 {
            out.push(start..self.words.len());
        }
        out
    }
}

/// Iterator over runs of marked pages; see [`DirtyBitmap::runs`].
#[derive(Clone, Debug)]
pub struct Runs<'a> {
    words: &'a [u64],
    /// Index of the next word to load.
    next: usize,
    /// Remaining bits of the current word, already shifted so bit 0 is page `base`.
    cur: u64,
    /// Page index of bit 0 of `cur`.
    base: usize,
    /// A run that reached the top of its word and may continue into the next one.
    pending: Option<Range<usize>>,
}

impl Iterator for Runs<'_> {
    type Item = Range<usize>;

    #[inline]
    fn next(&mut self) -> Option<Range<usize>> {
        loop {
            if self.cur == 0 {
                // Load the next non-zero word, skipping clear ones quickly.
                let mut w = 0;
                while self.next < self.words.len() {
                    w = self.words[self.next];
                    if w != 0 {
                        break;
                    }
                    self.next += 1;
                }
                if self.next >= self.words.len() {
                    return self.pending.take();
                }
                self.base = self.next * WORD_BITS;
                self.next += 1;
                self.cur = w;
                // A pending run continues only if this word is adjacent and starts with a set bit.
                if let Some(p) = &self.pending
                    && (p.end != self.base || w & 1 == 0)
                {
                    return self.pending.take();
                }
            }
            let zeros = self.cur.trailing_zeros() as usize;
            let shifted = self.cur >> zeros;
            let ones = shifted.trailing_ones() as usize;
            let start = self.base + zeros;
            let end = start + ones;
            let consumed = zeros + ones;
            if consumed >= WORD_BITS {
                self.cur = 0;
            } else {
                self.cur = shifted >> ones;
                self.base += consumed;
            }
            let run = match self.pending.take() {
                Some(p) if p.end == start => p.start..end,
                Some(p) => {
                    // Cannot happen (checked on load), but never drop a run.
                    self.pending = Some(start..end);
                    return Some(p);
                }
                None => start..end,
            };
            if end.is_multiple_of(WORD_BITS) && self.cur == 0 {
                // Touches the top of the word: may continue into the next word.
                self.pending = Some(run);
                continue;
            }
            return Some(run);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_runs(map: &DirtyBitmap) -> Vec<Range<usize>> {
        let mut out: Vec<Range<usize>> = Vec::new();
        for p in 0..map.len() {
            if map.test(p) {
                match out.last_mut() {
                    Some(r) if r.end == p => r.end = p + 1,
                    _ => out.push(p..p + 1),
                }
            }
        }
        out
    }

    #[test]
    fn runs_join_across_words() {
        let mut m = DirtyBitmap::new(300);
        m.set_range(60..130).unwrap();
        m.set(200).unwrap();
        m.set_range(255..300).unwrap();
        assert_eq!(m.runs().collect::<Vec<_>>(), vec![60..130, 200..201, 255..300]);
        assert_eq!(m.count(), 70 + 1 + 45);
    }

    #[test]
    fn full_map_is_one_run() {
        let mut m = DirtyBitmap::new(64 * 5);
        m.set_all();
        assert_eq!(m.runs().collect::<Vec<_>>(), vec![0..320]);
    }

    #[test]
    fn from_words_rejects_wrong_length_and_masks_tail() {
        assert!(matches!(
            DirtyBitmap::from_words(vec![0; 3], 64),
            Err(RamError::BitmapSize { .. })
        ));
        let m = DirtyBitmap::from_words(vec![u64::MAX], 10).unwrap();
        assert_eq!(m.count(), 10);
        assert_eq!(m.runs().collect::<Vec<_>>(), vec![0..10]);
    }

    #[test]
    fn takes_atomic_bitmap_and_resets_it() {
        let atomic =
            vm_memory::bitmap::AtomicBitmap::new(100 * 4096, std::num::NonZeroUsize::new(4096).unwrap());
        atomic.set_addr_range(4096 * 63, 4096 * 3);
        let m = DirtyBitmap::take_atomic(&atomic);
        assert_eq!(m.len(), 100);
        assert_eq!(m.runs().collect::<Vec<_>>(), vec![63..66]);
        assert!(DirtyBitmap::take_atomic(&atomic).is_clear());
    }

    #[test]
    fn out_of_range_page_is_an_error() {
        let mut m = DirtyBitmap::new(10);
        assert!(matches!(
            m.set(10),
            Err(RamError::PageIndex { page: 10, pages: 10 })
        ));
        assert!(m.set_range(5..11).is_err());
        assert!(!m.test(1000));
    }

    #[test]
    fn balanced_ranges_cover_everything() {
        let mut m = DirtyBitmap::new(64 * 100);
        for p in (0..6400).step_by(7) {
            m.set(p).unwrap();
        }
        let parts = m.balanced_word_ranges(3);
        assert_eq!(parts.len(), 3);
        let joined: Vec<usize> = parts
            .iter()
            .flat_map(|r| m.runs_in_words(r.clone()).flatten())
            .collect();
        assert_eq!(joined, m.iter_pages().collect::<Vec<_>>());
    }

    proptest::proptest! {
        #[test]
        fn runs_match_naive_loop(bits in 0usize..600, words in proptest::collection::vec(proptest::num::u64::ANY, 10),
                                 dense in proptest::bool::ANY) {
            let n = bits.div_ceil(64);
            let mut raw: Vec<u64> = words.iter().cycle().take(n).copied().collect();
            if dense {
                // Long runs: mostly full words.
                for (i, w) in raw.iter_mut().enumerate() { if i % 3 != 0 { *w = u64::MAX; } }
            }
            let m = DirtyBitmap::from_words(raw, bits).unwrap();
            proptest::prop_assert_eq!(m.runs().collect::<Vec<_>>(), naive_runs(&m));
            let naive_count = (0..bits).filter(|&p| m.test(p)).count();
            proptest::prop_assert_eq!(m.count(), naive_count);
        }

        #[test]
        fn ranges_match_naive(bits in 1usize..400, a in 0usize..400, b in 0usize..400, set in proptest::bool::ANY) {
            let (lo, hi) = (a.min(b).min(bits), a.max(b).min(bits));
            let mut m = DirtyBitmap::new(bits);
            if !set { m.set_all(); }
            let mut naive = vec![!set; bits];
            if set { m.set_range(lo..hi).unwrap(); } else { m.clear_range(lo..hi).unwrap(); }
            for v in &mut naive[lo..hi] { *v = set; }
            for (p, v) in naive.iter().enumerate() { proptest::prop_assert_eq!(m.test(p), *v); }
        }
    }
}
