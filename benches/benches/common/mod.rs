//! Shared by the bench targets: short criterion settings and a scattered page set.

#![allow(dead_code)]

use std::time::Duration;

use criterion::Criterion;

/// Guest page size.
pub const PAGE: usize = 4096;

/// Short runs: the whole suite finishes in a few minutes on a shared 2-core machine.
pub fn criterion() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .configure_from_args()
}

/// `n` distinct pages out of `total`, spread pseudo-randomly, ascending (as a dirty log returns them).
pub fn scattered_pages(total: usize, n: usize) -> Vec<usize> {
    let mut taken = vec![false; total];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut left = n.min(total);
    while left > 0 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let i = (x % total as u64) as usize;
        if !std::mem::replace(&mut taken[i], true) {
            left -= 1;
        }
    }
    (0..total).filter(|&i| taken[i]).collect()
}

/// The physical reference: copies each listed 4 KiB page of `src` into consecutive slots of `dst`.
pub fn gather_pages(src: &[u8], pages: &[usize], dst: &mut [u8]) {
    for (k, &p) in pages.iter().enumerate() {
        dst[k * PAGE..][..PAGE].copy_from_slice(&src[p * PAGE..][..PAGE]);
    }
}

/// The physical reference: copies consecutive 4 KiB slots of `src` to the listed pages of `dst`.
pub fn scatter_pages(src: &[u8], pages: &[usize], dst: &mut [u8]) {
    for (k, &p) in pages.iter().enumerate() {
        dst[p * PAGE..][..PAGE].copy_from_slice(&src[k * PAGE..][..PAGE]);
    }
}
