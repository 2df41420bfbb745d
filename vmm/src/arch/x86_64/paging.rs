//! Identity-mapped page tables for the 64-bit entry: the first 1 GiB in 2 MiB pages, enough for
//! the kernel image, zero page and initial stack. The kernel installs its own tables early.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{PDE_START, PDPTE_START, PML4_START};

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const HUGE: u64 = 1 << 7;

/// The three tables as (address, entries). `user` sets U/S so ring-3 test guests can run.
pub fn identity_tables(user: bool) -> [(u64, Vec<u64>); 3] {
    let u = if user { USER } else { 0 };
    let pml4 = vec![PDPTE_START | PRESENT | WRITABLE | u];
    let pdpt = vec![PDE_START | PRESENT | WRITABLE | u];
    let pd = (0..512u64)
        .map(|i| (i << 21) | PRESENT | WRITABLE | HUGE | u)
        .collect();
    [(PML4_START, pml4), (PDPTE_START, pdpt), (PDE_START, pd)]
}

/// Writes the tables and returns CR3.
pub fn write_identity_tables(
    mem: &GuestMemoryMmap,
    user: bool,
) -> Result<u64, vm_memory::GuestMemoryError> {
    for (addr, entries) in identity_tables(user) {
        for (i, e) in entries.iter().enumerate() {
            mem.write_obj(*e, GuestAddress(addr + 8 * i as u64))?;
        }
    }
    Ok(PML4_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks the written tables like the MMU does for a 2 MiB page.
    fn translate(mem: &GuestMemoryMmap, cr3: u64, va: u64) -> Option<(u64, u64)> {
        let pml4e: u64 = mem
            .read_obj(GuestAddress(cr3 + 8 * ((va >> 39) & 511)))
            .ok()?;
        if pml4e & PRESENT == 0 {
            return None;
        }
        let pdpte: u64 = mem
            .read_obj(GuestAddress((pml4e & !0xfff) + 8 * ((va >> 30) & 511)))
            .ok()?;
        if pdpte & PRESENT == 0 {
            return None;
        }
        let pde: u64 = mem
            .read_obj(GuestAddress((pdpte & !0xfff) + 8 * ((va >> 21) & 511)))
            .ok()?;
        if pde & PRESENT == 0 || pde & HUGE == 0 {
            return None;
        }
        Some(((pde & !0x1f_ffff) | (va & 0x1f_ffff), pde & USER))
    }

    #[test]
    fn first_gigabyte_is_identity_mapped() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let cr3 = write_identity_tables(&mem, false).unwrap();
        assert_eq!(cr3, PML4_START);
        for va in [0u64, 0x7000, 0x100_0000, 0x1234_5678, (1 << 30) - 1] {
            assert_eq!(translate(&mem, cr3, va), Some((va, 0)), "va {va:#x}");
        }
        assert_eq!(translate(&mem, cr3, 1 << 30), None);
    }

    #[test]
    fn user_tables_set_the_user_bit_everywhere() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let cr3 = write_identity_tables(&mem, true).unwrap();
        assert_eq!(translate(&mem, cr3, 0x40_0000), Some((0x40_0000, USER)));
        let pml4e: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_ne!(pml4e & USER, 0);
    }

    #[test]
    fn tables_past_memory_end_are_an_error() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x9000)]).unwrap();
        assert!(write_identity_tables(&mem, false).is_err());
    }
}
