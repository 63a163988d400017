//! Criterion bench: encode and decode of a 4 MiB page batch, beside a 4 MiB memcpy.
fn main() {}
