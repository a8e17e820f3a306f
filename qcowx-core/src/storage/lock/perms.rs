//! The permissions of QEMU's image locks ([`Permission`]) and sets of them
//! ([`Permissions`]): which byte each takes (see the [lock module](super)).

use std::fmt;
use std::ops::{BitAnd, BitOr, Not};

use super::{PERM_LOCK_BASE, SHARED_LOCK_BASE};

/// One of QEMU's block-layer permissions that take part in image locking.
///
/// ```
/// use qcowx_core::storage::lock::Permission;
///
/// assert_eq!(Permission::Write.bit(), 1);
/// assert_eq!(Permission::Write.name(), "write");
/// assert_eq!((Permission::Write.perm_byte(), Permission::Write.shared_byte()), (101, 201));
/// assert_eq!(Permission::ALL.len(), 4);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Permission {
    /// Reading with the guarantee that the contents are complete and self-consistent
    /// (QEMU's `BLK_PERM_CONSISTENT_READ`, bit 0).
    ConsistentRead,
    /// Changing the visible contents (QEMU's `BLK_PERM_WRITE`, bit 1).
    Write,
    /// Writing without changing the visible contents (QEMU's
    /// `BLK_PERM_WRITE_UNCHANGED`, bit 2).
    WriteUnchanged,
    /// Changing the size of the file (QEMU's `BLK_PERM_RESIZE`, bit 3).
    Resize,
}

impl Permission {
    /// Every permission, in bit order.
    pub const ALL: [Permission; 4] = [
        Permission::ConsistentRead,
        Permission::Write,
        Permission::WriteUnchanged,
        Permission::Resize,
    ];

    /// The permission's bit index in QEMU's `BLK_PERM_*` mask (0 to 3).
    pub const fn bit(self) -> u32 {
        match self {
            Permission::ConsistentRead => 0,
            Permission::Write => 1,
            Permission::WriteUnchanged => 2,
            Permission::Resize => 3,
        }
    }

    /// The name QEMU uses for the permission in its error messages, e.g. `"write"`.
    pub const fn name(self) -> &'static str {
        match self {
            Permission::ConsistentRead => "consistent read",
            Permission::Write => "write",
            Permission::WriteUnchanged => "write unchanged",
            Permission::Resize => "resize",
        }
    }

    /// The offset of the byte held by users of this permission.
    pub const fn perm_byte(self) -> u64 {
        PERM_LOCK_BASE + self.bit() as u64
    }

    /// The offset of the byte held by users that do not share this permission.
    pub const fn shared_byte(self) -> u64 {
        SHARED_LOCK_BASE + self.bit() as u64
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of [`Permission`]s, with the same bit layout as QEMU's `BLK_PERM_*` mask.
///
/// ```
/// use qcowx_core::storage::lock::{Permission, Permissions};
///
/// let rw = Permissions::CONSISTENT_READ | Permissions::single(Permission::Write);
/// assert_eq!(rw.bits(), 0b0011);
/// assert!(rw.has(Permission::Write) && !rw.has(Permission::Resize));
/// assert!(rw.contains(Permissions::CONSISTENT_READ));
/// assert!(!rw.is_empty() && Permissions::NONE.is_empty());
/// assert_eq!(rw.iter().collect::<Vec<_>>(), [Permission::ConsistentRead, Permission::Write]);
/// assert_eq!(Permissions::from_bits_truncate(0xff), Permissions::ALL);
/// assert_eq!(!rw, Permissions::WRITE_UNCHANGED | Permissions::RESIZE);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Permissions(pub(super) u8);

impl Permissions {
    /// The empty set.
    pub const NONE: Permissions = Permissions(0);
    /// Only [`Permission::ConsistentRead`].
    pub const CONSISTENT_READ: Permissions = Permissions(1);
    /// Only [`Permission::Write`].
    pub const WRITE: Permissions = Permissions(1 << 1);
    /// Only [`Permission::WriteUnchanged`].
    pub const WRITE_UNCHANGED: Permissions = Permissions(1 << 2);
    /// Only [`Permission::Resize`].
    pub const RESIZE: Permissions = Permissions(1 << 3);
    /// Every permission (QEMU's `BLK_PERM_ALL`).
    pub const ALL: Permissions = Permissions(0x0f);

    /// The set as a QEMU `BLK_PERM_*` mask.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// The set holding the permissions whose bits are set in `bits`; unknown bits are
    /// ignored.
    pub const fn from_bits_truncate(bits: u8) -> Permissions {
        Permissions(bits & Permissions::ALL.0)
    }

    /// The set holding just `perm`.
    pub const fn single(perm: Permission) -> Permissions {
        Permissions(1 << perm.bit())
    }

    /// Whether the set holds `perm`.
    pub const fn has(self, perm: Permission) -> bool {
        self.0 & (1 << perm.bit()) != 0
    }

    /// Whether every permission of `other` is in the set.
    pub const fn contains(self, other: Permissions) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The permissions in the set, in bit order.
    pub fn iter(self) -> impl Iterator<Item = Permission> {
        Permission::ALL.into_iter().filter(move |p| self.has(*p))
    }
}

impl From<Permission> for Permissions {
    fn from(perm: Permission) -> Permissions {
        Permissions::single(perm)
    }
}

impl BitOr for Permissions {
    type Output = Permissions;
    fn bitor(self, rhs: Permissions) -> Permissions {
        Permissions(self.0 | rhs.0)
    }
}

impl BitAnd for Permissions {
    type Output = Permissions;
    fn bitand(self, rhs: Permissions) -> Permissions {
        Permissions(self.0 & rhs.0)
    }
}

impl Not for Permissions {
    type Output = Permissions;
    /// The complement within [`Permissions::ALL`].
    fn not(self) -> Permissions {
        Permissions(!self.0 & Permissions::ALL.0)
    }
}

impl fmt::Display for Permissions {
    /// Formats the set like QEMU does, e.g. `consistent read, write`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for perm in self.iter() {
            if !first {
                f.write_str(", ")?;
            }
            first = false;
            f.write_str(perm.name())?;
        }
        Ok(())
    }
}

impl fmt::Debug for Permissions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Permissions({self})")
    }
}
