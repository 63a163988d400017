//! colo-vmm command line.
fn main() {}
