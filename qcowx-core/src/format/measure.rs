//! How many bytes a QCOW2 file needs: the metadata of a fully allocated image and of
//! persistent bitmaps, computed from the format's layout alone (no I/O). The numbers
//! are `qemu-img measure`'s: an image whose every cluster is allocated needs exactly
//! the fully allocated size (header, L1 and L2 tables covering the whole disk, the
//! refcount structures that count all of it, and the data).

/// Bytes of one L1 entry and of one refcount table entry.
const TABLE_ENTRY: u64 = 8;

/// Bytes of a bitmap directory entry before its name (the fixed fields).
const BITMAP_DIR_ENTRY_FIXED: u64 = 24;

fn round_up(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
}

/// Bytes of the refcount table and blocks that count `clusters` clusters together
/// with themselves (the blocks and table clusters are counted too): the smallest
/// table and block counts that cover everything, found by iterating to the fixed
/// point.
///
/// ```
/// use qcowx_core::format::measure::refcount_metadata_bytes;
///
/// // 64 KiB clusters, 16-bit refcounts: one block counts 32,768 clusters; a
/// // handful of clusters need one block and one table cluster.
/// assert_eq!(refcount_metadata_bytes(5, 65536, 16), 2 * 65536);
/// // 32,767 clusters plus their block and table: 32,769, past one block.
/// assert_eq!(refcount_metadata_bytes(32_767, 65536, 16), 3 * 65536);
/// ```
pub fn refcount_metadata_bytes(clusters: u64, cluster_size: u64, refcount_bits: u32) -> u64 {
    let per_block = cluster_size * 8 / u64::from(refcount_bits.max(1));
    let blocks_per_table_cluster = cluster_size / TABLE_ENTRY;
    let (mut blocks, mut table) = (0u64, 0u64);
    loop {
        let next_blocks = (clusters + blocks + table).div_ceil(per_block);
        let next_table = next_blocks.div_ceil(blocks_per_table_cluster);
        if (next_blocks, next_table) == (blocks, table) {
            return (blocks + table) * cluster_size;
        }
        (blocks, table) = (next_blocks, next_table);
    }
}

/// Bytes of a QCOW2 file of `virtual_size` bytes whose every cluster is allocated:
/// one header cluster, the L2 tables and the L1 table for the whole disk (whole
/// tables and whole L1 clusters), the refcount structures counting all of that, and
/// the data (the virtual size rounded up to a cluster).
///
/// ```
/// use qcowx_core::format::measure::fully_allocated_bytes;
///
/// // 16 GiB, 64 KiB clusters, 16-bit refcounts: what `qemu-img measure` says.
/// assert_eq!(fully_allocated_bytes(16 << 30, 65536, 16, false), 17_182_752_768);
/// // 1000 bytes: header, L2, L1, refcount table and block, one data cluster.
/// assert_eq!(fully_allocated_bytes(1000, 65536, 16, false), 6 * 65536);
/// ```
pub fn fully_allocated_bytes(
    virtual_size: u64,
    cluster_size: u64,
    refcount_bits: u32,
    extended_l2: bool,
) -> u64 {
    let data = round_up(virtual_size, cluster_size);
    let l2_entry = if extended_l2 { 16 } else { 8 };
    let l2_entries = round_up(data / cluster_size, cluster_size / l2_entry);
    let l1_entries = round_up(
        l2_entries * l2_entry / cluster_size,
        cluster_size / TABLE_ENTRY,
    );
    let tables = cluster_size + l2_entries * l2_entry + l1_entries * TABLE_ENTRY;
    let refcounts =
        refcount_metadata_bytes((tables + data) / cluster_size, cluster_size, refcount_bits);
    tables + refcounts + data
}

/// Bytes persistent bitmaps take in an image of `cluster_size` clusters: each
/// bitmap's data clusters (all of them, as if every bit were set), its table
/// clusters, and the directory of all of them. `bitmaps` lists each bitmap's name
/// length in bytes, the disk size it covers and its granularity.
///
/// ```
/// use qcowx_core::format::measure::bitmap_bytes;
///
/// // One bitmap over 1 GiB at 64 KiB granularity: 2 KiB of bits, one data cluster,
/// // one table cluster, one directory cluster.
/// assert_eq!(bitmap_bytes(&[(2, 1 << 30, 65536)], 65536), 3 * 65536);
/// assert_eq!(bitmap_bytes(&[], 65536), 0);
/// ```
pub fn bitmap_bytes(bitmaps: &[(usize, u64, u64)], cluster_size: u64) -> u64 {
    let mut total = 0;
    let mut directory = 0;
    for &(name_len, disk_size, granularity) in bitmaps {
        let bits = disk_size.div_ceil(granularity.max(1));
        let data_clusters = bits.div_ceil(8).div_ceil(cluster_size);
        total += data_clusters * cluster_size;
        total += round_up(data_clusters * TABLE_ENTRY, cluster_size);
        directory += round_up(BITMAP_DIR_ENTRY_FIXED + name_len as u64, 8);
    }
    total + round_up(directory, cluster_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sizes `qemu-img measure --size N -O qcow2 -o ...` printed (QEMU 10.0).
    #[test]
    fn fully_allocated_sizes_are_qemu_img_measures() {
        for (size, cluster, refcount_bits, extended, want) in [
            (16u64 << 30, 65536u64, 16u32, false, 17_182_752_768u64),
            (16 << 30, 4096, 64, false, 17_247_252_480),
            (1 << 30, 65536, 16, false, 1_074_135_040),
            (1 << 30, 65536, 16, true, 1_074_266_112),
            (1000, 65536, 16, false, 393_216),
        ] {
            assert_eq!(
                fully_allocated_bytes(size, cluster, refcount_bits, extended),
                want,
                "{size} {cluster} {refcount_bits} {extended}"
            );
        }
    }

    /// The fixed point covers everything it counts, and no smaller one would.
    #[test]
    fn refcount_structures_count_themselves() {
        for clusters in [0u64, 1, 1000, 32_766, 32_767, 32_768, 1 << 24] {
            for (cs, bits) in [(512u64, 1u32), (65536, 16), (65536, 64), (2 << 20, 32)] {
                let bytes = refcount_metadata_bytes(clusters, cs, bits);
                let n = bytes / cs;
                let per_block = cs * 8 / u64::from(bits);
                let blocks_needed = |total: u64| total.div_ceil(per_block);
                // Some split of n into blocks and table clusters counts all.
                let ok = (0..=n).any(|t| {
                    let b = n - t;
                    b >= blocks_needed(clusters + n) && t >= b.div_ceil(cs / 8)
                });
                assert!(
                    ok,
                    "{clusters} clusters, {cs}/{bits}: {n} clusters do not cover"
                );
            }
        }
    }
}
