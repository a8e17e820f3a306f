//! Who holds an image-lock byte. Open-file-description locks record no owner, so the
//! holder is the open file description of the same file whose locks cover the byte,
//! found through `/proc/PID/fd` (which file) and `/proc/PID/fdinfo` (which locks).
//! Only processes this user may inspect are seen; called only after a conflict.

use std::fs::File;

use super::LockHolder;

/// The holder of `byte` of `file`, other than `file`'s own description (which must
/// hold no lock bytes when this is called).
pub(super) fn find(file: &File, byte: u64) -> LockHolder {
    imp::find(file, byte)
}

#[cfg(any(target_os = "linux", target_os = "android"))]
mod imp {
    use std::fs::{self, File};
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;

    use super::LockHolder;

    pub(super) fn find(file: &File, byte: u64) -> LockHolder {
        let Ok(meta) = file.metadata() else {
            return LockHolder::Unknown;
        };
        let id = (meta.dev(), meta.ino());
        let own = std::process::id();
        if holds(Path::new("/proc/self"), id, byte) {
            return LockHolder::ThisProcess;
        }
        let Ok(procs) = fs::read_dir("/proc") else {
            return LockHolder::Unknown;
        };
        let holders: Vec<u32> = procs
            .flatten()
            .filter_map(|entry| {
                let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
                (pid != own && holds(&entry.path(), id, byte)).then_some(pid)
            })
            .collect();
        // A child the holder is forking shares its descriptions until it executes
        // (they close on exec): name the holder, not such a child.
        let Some(&pid) = holders
            .iter()
            .find(|&&pid| parent(pid).is_none_or(|p| !holders.contains(&p)))
        else {
            return LockHolder::Unknown;
        };
        let name = fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|s| s.trim_end().to_string())
            .unwrap_or_default();
        LockHolder::Process { pid, name }
    }

    /// The parent of process `pid` (field 4 of `/proc/PID/stat`, after the
    /// parenthesised name, which may itself hold spaces and parentheses).
    fn parent(pid: u32) -> Option<u32> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let after_name = &stat[stat.rfind(')')? + 1..];
        after_name.split_whitespace().nth(1)?.parse().ok()
    }

    /// Whether the process at `proc` has a description of file `id` locking `byte`.
    fn holds(proc: &Path, id: (u64, u64), byte: u64) -> bool {
        let Ok(fds) = fs::read_dir(proc.join("fd")) else {
            return false;
        };
        fds.flatten().any(|fd| {
            let same = fs::metadata(fd.path()).is_ok_and(|m| (m.dev(), m.ino()) == id);
            same && fs::read_to_string(proc.join("fdinfo").join(fd.file_name()))
                .is_ok_and(|info| info.lines().any(|l| covers(l, byte)))
        })
    }

    /// Whether an fdinfo line `lock:\t1: OFDLCK ADVISORY READ -1 fe:00:123 100 100`
    /// (a held lock, not a waiter's `->` line) covers `byte`.
    fn covers(line: &str, byte: u64) -> bool {
        let Some(rest) = line.strip_prefix("lock:") else {
            return false;
        };
        if rest.contains("->") {
            return false;
        }
        let mut words = rest.split_whitespace().rev();
        let (Some(end), Some(start)) = (words.next(), words.next()) else {
            return false;
        };
        let Ok(start) = start.parse::<u64>() else {
            return false;
        };
        let end = if end == "EOF" {
            u64::MAX
        } else {
            match end.parse::<u64>() {
                Ok(e) => e,
                Err(_) => return false,
            }
        };
        (start..=end).contains(&byte)
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn reads_a_parent_from_stat() {
            let me = std::process::id();
            let parent = super::parent(me).expect("this process has a parent");
            assert_eq!(
                parent,
                std::os::unix::process::parent_id(),
                "field 4 of /proc/self/stat"
            );
        }

        #[test]
        fn reads_fdinfo_lock_lines() {
            let line = "lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:10010777 201 201";
            assert!(super::covers(line, 201));
            assert!(!super::covers(line, 200));
            assert!(super::covers(
                "lock:\t2: POSIX ADVISORY WRITE 7 fe:00:1 0 EOF",
                103
            ));
            assert!(!super::covers(
                "lock:\t1: -> OFDLCK ADVISORY READ -1 fe:00:1 0 EOF",
                9
            ));
            assert!(!super::covers("pos:\t0", 0));
        }
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
mod imp {
    use std::fs::File;

    use super::LockHolder;

    pub(super) fn find(_file: &File, _byte: u64) -> LockHolder {
        LockHolder::Unknown
    }
}
