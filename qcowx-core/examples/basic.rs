//! Opens (or creates) an image, writes a pattern, flushes, reads it back.
//!
//! ```text
//! cargo run -p qcowx-core --example basic -- /tmp/demo.qcow2
//! ```

use qcowx_core::{CreateOptions, Image};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "demo.qcow2".to_string());
    let img = if std::path::Path::new(&path).exists() {
        Image::open_rw(&path)?
    } else {
        Image::create(&path, &CreateOptions::new(1 << 30))?
    };
    let data = vec![0xa5u8; 65536];
    img.write_at(&data, 1 << 20)?;
    img.flush()?;
    let mut back = vec![0u8; 65536];
    img.read_at(&mut back, 1 << 20)?;
    assert_eq!(back, data);
    for e in img.block_status(0, img.size().min(4 << 20))? {
        println!(
            "{:>10} +{:<10} {:?} depth {}",
            e.offset, e.length, e.status, e.depth
        );
    }
    img.close()?;
    println!("{path}: wrote, flushed and read back 64 KiB at 1 MiB");
    Ok(())
}
