//! The storage seam: [`BlockBackend`], with a raw image file ([`RawFile`]) and memory ([`MemBackend`]).
//!
//! Every request is sector aligned: offset and length are multiples of [`SECTOR_SIZE`] and the range lies
//! within the device. [`check_request`] is the one place that rule lives; the implementations here call it
//! first and report a typed error before touching storage.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Error, Result};

/// Size of a sector: the alignment unit of every request.
pub const SECTOR_SIZE: u64 = 512;

/// Largest zero buffer [`BlockBackend::discard`]'s default implementation writes at once.
const ZERO_CHUNK: usize = 1 << 20;

/// A fixed-size block device.
///
/// Reads take `&self` so that a reader never needs exclusive access; writes, flushes and discards take
/// `&mut self`. `flush` is the durability point: after it returns, every write that completed before it
/// survives a crash of the host.
pub trait BlockBackend {
    /// Length of the device in bytes (a multiple of [`SECTOR_SIZE`]).
    fn len(&self) -> u64;

    /// True when the device has no sectors.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// Writes `data` at `offset`.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()>;

    /// Makes every completed write durable.
    fn flush(&mut self) -> Result<()>;

    /// Declares `len` bytes at `offset` unused; later reads of the range return zeros.
    ///
    /// The default writes zeros, which is always correct; a backend with a cheaper way overrides it.
    fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        check_request(offset, len, self.len())?;
        let zeros = vec![0u8; (len as usize).min(ZERO_CHUNK)];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.write_at(offset + done, &zeros[..n])?;
            done += n as u64;
        }
        Ok(())
    }
}

/// Checks that `offset` and `len` are sector aligned and that the range fits in a device of `device_len`.
pub fn check_request(offset: u64, len: u64, device_len: u64) -> Result<()> {
    if !offset.is_multiple_of(SECTOR_SIZE) || !len.is_multiple_of(SECTOR_SIZE) {
        return Err(Error::Misaligned {
            offset,
            len,
            align: SECTOR_SIZE,
        });
    }
    match offset.checked_add(len) {
        Some(end) if end <= device_len => Ok(()),
        _ => Err(Error::OutOfRange {
            offset,
            len,
            device_len,
        }),
    }
}

impl<B: BlockBackend + ?Sized> BlockBackend for &mut B {
    fn len(&self) -> u64 {
        (**self).len()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        (**self).read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        (**self).write_at(offset, data)
    }
    fn flush(&mut self) -> Result<()> {
        (**self).flush()
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        (**self).discard(offset, len)
    }
}

impl<B: BlockBackend + ?Sized> BlockBackend for Box<B> {
    fn len(&self) -> u64 {
        (**self).len()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        (**self).read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        (**self).write_at(offset, data)
    }
    fn flush(&mut self) -> Result<()> {
        (**self).flush()
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        (**self).discard(offset, len)
    }
}

/// A raw disk image file, accessed with `pread`/`pwrite` (`std::os::unix::fs::FileExt`).
///
/// The length is fixed when the file is opened; `flush` is `fdatasync`.
#[derive(Debug)]
pub struct RawFile {
    file: File,
    len: u64,
}

impl RawFile {
    /// Opens an existing raw image read-write. Its size must be a multiple of [`SECTOR_SIZE`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| Error::Io {
                op: "open",
                offset: 0,
                source,
            })?;
        Self::from_file(file)
    }

    /// Creates (or truncates) a raw image of `len` bytes, sparse and reading as zeros.
    pub fn create(path: impl AsRef<Path>, len: u64) -> Result<Self> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(Error::Misaligned {
                offset: 0,
                len,
                align: SECTOR_SIZE,
            });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|source| Error::Io {
                op: "create",
                offset: 0,
                source,
            })?;
        file.set_len(len).map_err(|source| Error::Io {
            op: "set_len",
            offset: len,
            source,
        })?;
        Ok(RawFile { file, len })
    }

    /// Wraps an open file. Its size must be a multiple of [`SECTOR_SIZE`].
    pub fn from_file(file: File) -> Result<Self> {
        let len = file
            .metadata()
            .map_err(|source| Error::Io {
                op: "stat",
                offset: 0,
                source,
            })?
            .len();
        if len % SECTOR_SIZE != 0 {
            return Err(Error::Misaligned {
                offset: 0,
                len,
                align: SECTOR_SIZE,
            });
        }
        Ok(RawFile { file, len })
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl BlockBackend for RawFile {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_request(offset, buf.len() as u64, self.len)?;
        self.file.read_exact_at(buf, offset).map_err(|source| Error::Io {
            op: "read",
            offset,
            source,
        })
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        check_request(offset, data.len() as u64, self.len)?;
        self.file.write_all_at(data, offset).map_err(|source| Error::Io {
            op: "write",
            offset,
            source,
        })
    }

    fn flush(&mut self) -> Result<()> {
        self.file.sync_data().map_err(|source| Error::Io {
            op: "flush",
            offset: 0,
            source,
        })
    }
}

/// A device held in memory. `flush` does nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemBackend {
    data: Vec<u8>,
}

impl MemBackend {
    /// A zero-filled device of `len` bytes (a multiple of [`SECTOR_SIZE`]).
    pub fn new(len: u64) -> Result<Self> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(Error::Misaligned {
                offset: 0,
                len,
                align: SECTOR_SIZE,
            });
        }
        let len = usize::try_from(len).map_err(|_| Error::InvalidConfig("device larger than memory"))?;
        Ok(MemBackend { data: vec![0; len] })
    }

    /// A device holding `data` (its length a multiple of [`SECTOR_SIZE`]).
    pub fn from_vec(data: Vec<u8>) -> Result<Self> {
        if !(data.len() as u64).is_multiple_of(SECTOR_SIZE) {
            return Err(Error::Misaligned {
                offset: 0,
                len: data.len() as u64,
                align: SECTOR_SIZE,
            });
        }
        Ok(MemBackend { data })
    }

    /// The device's contents.
    pub fn as_slice(&self) -> &[u8] {
        &self.data
    }

    /// The device's contents, consuming it.
    pub fn into_vec(self) -> Vec<u8> {
        self.data
    }
}

impl BlockBackend for MemBackend {
    fn len(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_request(offset, buf.len() as u64, self.len())?;
        let start = offset as usize;
        buf.copy_from_slice(&self.data[start..start + buf.len()]);
        Ok(())
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        check_request(offset, data.len() as u64, self.len())?;
        let start = offset as usize;
        self.data[start..start + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        Ok(())
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        check_request(offset, len, self.len())?;
        self.data[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn misaligned_offset_and_length_are_typed_errors() {
        let mut m = MemBackend::new(4096).unwrap();
        assert!(matches!(
            m.write_at(1, &[0; 512]),
            Err(Error::Misaligned { offset: 1, .. })
        ));
        assert!(matches!(
            m.write_at(0, &[0; 100]),
            Err(Error::Misaligned { len: 100, .. })
        ));
        let mut buf = [0u8; 512];
        assert!(matches!(m.read_at(256, &mut buf), Err(Error::Misaligned { .. })));
    }

    #[test]
    fn out_of_range_and_overflow_are_typed_errors() {
        let mut m = MemBackend::new(4096).unwrap();
        assert!(matches!(
            m.write_at(4096, &[0; 512]),
            Err(Error::OutOfRange { device_len: 4096, .. })
        ));
        assert!(matches!(
            check_request(u64::MAX - 511, 1024, u64::MAX),
            Err(Error::OutOfRange { .. })
        ));
        assert!(MemBackend::new(1000).is_err());
    }

    #[test]
    fn mem_round_trip_and_discard_reads_zeros() {
        let mut m = MemBackend::new(8192).unwrap();
        m.write_at(512, &[7; 1024]).unwrap();
        let mut buf = [0u8; 2048];
        m.read_at(0, &mut buf).unwrap();
        assert_eq!(&buf[..512], &[0; 512]);
        assert_eq!(&buf[512..1536], &[7; 1024]);
        m.discard(1024, 512).unwrap();
        m.read_at(0, &mut buf).unwrap();
        assert_eq!(&buf[1024..1536], &[0; 512]);
        assert_eq!(&buf[512..1024], &[7; 512]);
    }

    #[test]
    fn raw_file_round_trip_and_default_discard() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let mut f = RawFile::create(&path, 1 << 20).unwrap();
        f.write_at(4096, &[0xab; 4096]).unwrap();
        f.flush().unwrap();
        drop(f);
        let mut f = RawFile::open(&path).unwrap();
        assert_eq!(f.len(), 1 << 20);
        let mut buf = vec![0u8; 4096];
        f.read_at(4096, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0xab));
        f.discard(4096, 4096).unwrap();
        f.read_at(4096, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert!(matches!(
            f.read_at(1 << 20, &mut buf),
            Err(Error::OutOfRange { .. })
        ));
    }
}
