//! The `snapshot_table` target: hostile bytes as a QCOW2 snapshot table, with the
//! qcowx block in each entry's extra data.
//!
//! An input is `COUNT ‖ TABLE`: a big-endian `u16` entry count, then the table bytes.
//! The table is parsed directly ([`qcowx_core::format::snapshot::parse_table`]); entries that
//! parse must serialize back to the same entries. Then the table becomes the snapshot
//! table of the [fixture](crate::fixture) image — in place of the fixture's own table
//! when it fits in the clusters that table occupies, else appended at the end of the
//! file — and that image goes through [`image_ops::exercise`] with a fixed op script
//! that lists, reads, snapshots, forks, writes, reverts, deletes, collects, checks,
//! closes and reopens. That is how the qcowx extra-data decoding (the crc32c-sealed
//! root block, lineage, VDI heads and generations) is reached: through the library's
//! own open path, not a copy of it.

use qcowx_core::format::snapshot::{parse_table, SnapshotEntry};

use crate::fixture::{self, CLUSTER_SIZE};
use crate::image_ops::{self, Op};

/// Header offset of `nb_snapshots` (u32).
const NB_SNAPSHOTS_AT: usize = 60;
/// Header offset of `snapshots_offset` (u64).
const SNAPSHOTS_OFFSET_AT: usize = 64;

/// Splits an input into the entry count and the table bytes.
pub fn split(data: &[u8]) -> (u32, &[u8]) {
    match data {
        [a, b, rest @ ..] => (u32::from(u16::from_be_bytes([*a, *b])), rest),
        _ => (0, &[]),
    }
}

/// The input for a table of `count` entries.
pub fn join(count: u16, table: &[u8]) -> Vec<u8> {
    let mut out = count.to_be_bytes().to_vec();
    out.extend_from_slice(table);
    out
}

/// The fixture image's own snapshot table, as an input (a seed).
pub fn fixture_input() -> Vec<u8> {
    let img = fixture::image_bytes();
    let (count, offset) = table_location(img);
    let entries = parse_table(&img[offset..], offset as u64, count)
        .expect("the fixture's snapshot table parses");
    let mut table = Vec::new();
    for e in &entries {
        e.write_to(&mut table);
    }
    join(count as u16, &table)
}

fn table_location(img: &[u8]) -> (u32, usize) {
    let be32 = |at: usize| u32::from_be_bytes(img[at..at + 4].try_into().expect("4 bytes"));
    let be64 = |at: usize| u64::from_be_bytes(img[at..at + 8].try_into().expect("8 bytes"));
    (be32(NB_SNAPSHOTS_AT), be64(SNAPSHOTS_OFFSET_AT) as usize)
}

/// The fixed op script run on the image (see [`Op`] for the encoding).
fn script() -> Vec<u8> {
    let mut s = Vec::new();
    // Snapshot VDI #0 as "s0"; fork snapshot #0 as "v1".
    s.extend_from_slice(&[Op::Snapshot.code(), 0, 0]);
    s.extend_from_slice(&[Op::Fork.code(), 0, 1]);
    // Write 4 KiB + 100 at guest offset 4096 * 3 of root #1.
    s.extend_from_slice(&[Op::Write.code(), 1, 0, 0, 0, 0, 24, 0x10, 0x64, 7]);
    // Revert VDI #0 to snapshot #1; delete snapshot #0 and VDI #1.
    s.extend_from_slice(&[Op::Revert.code(), 0, 1]);
    s.extend_from_slice(&[Op::DeleteSnapshot.code(), 0]);
    s.extend_from_slice(&[Op::DeleteVdi.code(), 1]);
    s.extend_from_slice(&[Op::Gc.code(), Op::Check.code(), Op::Reopen.code()]);
    s.extend_from_slice(&[Op::ReadAll.code()]);
    s
}

/// Runs one input (see the [module documentation](self)).
pub fn run(data: &[u8]) {
    let (count, table) = split(data);
    if let Ok(entries) = parse_table(table, 0, count) {
        round_trip(&entries, count);
    }
    let image = image_with_table(count, table);
    image_ops::exercise(&image, &script());
}

/// Entries that parsed serialize to bytes that parse to the same entries.
fn round_trip(entries: &[SnapshotEntry], count: u32) {
    let mut bytes = Vec::new();
    for e in entries {
        e.write_to(&mut bytes);
    }
    match parse_table(&bytes, 0, count) {
        Ok(back) => assert!(
            back == entries,
            "snapshot table entries do not survive serialization"
        ),
        Err(e) => panic!("serialized snapshot table entries do not parse again: {e}"),
    }
}

/// The fixture image with `table` as its snapshot table of `count` entries.
pub fn image_with_table(count: u32, table: &[u8]) -> Vec<u8> {
    let mut img = fixture::image_bytes().to_vec();
    let (old_count, old_offset) = table_location(&img);
    let old_len: usize = parse_table(&img[old_offset..], 0, old_count)
        .map(|es| es.iter().map(SnapshotEntry::encoded_len).sum())
        .unwrap_or(0);
    let cs = CLUSTER_SIZE as usize;
    let room = old_len.next_multiple_of(cs);
    let offset = if table.len() <= room {
        img[old_offset..old_offset + room].fill(0);
        old_offset
    } else {
        img.len().next_multiple_of(cs)
    };
    if img.len() < offset + table.len() {
        img.resize(offset + table.len(), 0);
    }
    img[offset..offset + table.len()].copy_from_slice(table);
    img[NB_SNAPSHOTS_AT..NB_SNAPSHOTS_AT + 4].copy_from_slice(&count.to_be_bytes());
    img[SNAPSHOTS_OFFSET_AT..SNAPSHOTS_OFFSET_AT + 8]
        .copy_from_slice(&(offset as u64).to_be_bytes());
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fixture_table_in_place_gives_back_the_fixture() {
        let input = fixture_input();
        let (count, table) = split(&input);
        assert_eq!(count, 3);
        let img = image_with_table(count, table);
        assert_eq!(img, fixture::image_bytes());
        run(&input);
    }
}
