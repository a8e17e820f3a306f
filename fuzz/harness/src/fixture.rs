//! A small qcowx image made in memory, shared by the targets that need a valid image.

use std::sync::{Arc, OnceLock};

use qcowx_core::storage::MemStorage;
use qcowx_core::{CreateOptions, Image, OpenOptions};

/// Virtual size of the fixture image.
pub const SIZE: u64 = 1 << 20;
/// Cluster size of the fixture image (small, to keep its metadata small).
pub const CLUSTER_SIZE: u64 = 4096;

/// The fixture's roots: the default VDI with snapshot `s1`, VDI `web` forked from
/// `s1` with snapshot `w1`. As NBD exports: `default`, `default@s1`, `web`, `web@w1`.
pub const EXPORTS: [&str; 4] = ["default", "default@s1", "web", "web@w1"];

fn build() -> Vec<u8> {
    let storage = Arc::new(MemStorage::new());
    let mut opts = CreateOptions::new(SIZE);
    opts.cluster_size = CLUSTER_SIZE;
    let img = Image::create_in(storage.clone(), &opts).expect("create the fixture image");
    let img = Arc::new(img);
    let fill = |d: &qcowx_core::Disk, seed: u8, at: &[u64]| {
        for (i, &off) in at.iter().enumerate() {
            let buf: Vec<u8> = (0..CLUSTER_SIZE as usize / 2)
                .map(|j| seed.wrapping_add((i * 7 + j / 511) as u8))
                .collect();
            d.write_at(&buf, off).expect("write the fixture image");
        }
    };
    let default = img.open_root("default").expect("open the default VDI");
    fill(&default, 1, &[0, 256 << 10, SIZE - 3 * CLUSTER_SIZE]);
    default
        .write_zeroes(512 << 10, 8 * CLUSTER_SIZE, false)
        .expect("zero part of the fixture image");
    img.snapshot("default", "s1").expect("snapshot the fixture");
    fill(&default, 40, &[CLUSTER_SIZE / 2, 768 << 10]);
    img.fork("s1", "web").expect("fork the fixture");
    let web = img.open_root("web").expect("open VDI web");
    fill(&web, 90, &[512, 512 << 10]);
    img.snapshot("web", "w1").expect("snapshot VDI web");
    fill(&web, 130, &[64 * CLUSTER_SIZE]);
    drop((default, web));
    img.close().expect("close the fixture image");
    storage.to_vec()
}

/// The fixture image's bytes (built once per process).
pub fn image_bytes() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(build)
}

/// Opens a fresh in-memory copy of `bytes` (readable; writable with `write`), without
/// opening a backing file.
pub fn open(bytes: &[u8], write: bool) -> qcowx_core::Result<Arc<Image>> {
    open_in(&Arc::new(MemStorage::from_vec(bytes.to_vec())), write)
}

/// Opens the image held by `storage` (readable; writable with `write`), without
/// opening a backing file.
pub fn open_in(storage: &Arc<MemStorage>, write: bool) -> qcowx_core::Result<Arc<Image>> {
    let opts = OpenOptions::new().write(write).open_backing(false);
    Image::from_storage(storage.clone(), &opts).map(Arc::new)
}

/// Opens the image held by `storage` for writing as `qcowx amend -o compat=1.1`
/// does first: a version 2 image is upgraded to version 3 as it opens (others open
/// as with [`open_in`]).
pub fn open_upgrading(storage: &Arc<MemStorage>) -> qcowx_core::Result<Arc<Image>> {
    let opts = OpenOptions::new().upgrade(true).open_backing(false);
    Image::from_storage(storage.clone(), &opts).map(Arc::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixture_has_its_roots_and_checks_clean() {
        let img = open(image_bytes(), false).expect("open");
        let names: Vec<String> = img
            .list()
            .expect("list")
            .into_iter()
            .map(|r| r.name)
            .collect();
        for n in ["default", "s1", "web", "w1"] {
            assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
        }
        let r = img.check().expect("check");
        assert_eq!(r.exit_code(), 0, "{:?}", r.messages);
    }
}
