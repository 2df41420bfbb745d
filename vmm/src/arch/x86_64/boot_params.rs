//! What the guest kernel is told at entry: the e820 map, the command line, the initrd, through
//! the Linux zero page (64-bit boot protocol) or the PVH start info.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::layout::{
    CMDLINE_START, EBDA_END, EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START, PVH_INFO_START,
    PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// The zero page holds at most this many e820 entries.
const E820_MAX: usize = 128;
/// Lowest RAM the guest may be given: kernel, initrd and page tables need room above 1 MiB.
pub const MIN_MEMORY: u64 = 32 << 20;

#[derive(Debug, Error)]
pub enum BootParamsError {
    #[error("guest memory of {0} MiB is too small; give the VM at least {min} MiB", min = MIN_MEMORY >> 20)]
    MemoryTooSmall(u64),
    #[error("the initrd ({size} bytes) does not fit in guest memory below {limit:#x} above the kernel (ends at {kernel_end:#x}); give the VM more memory or use a smaller initrd")]
    InitrdTooLarge {
        size: u64,
        limit: u64,
        kernel_end: u64,
    },
    #[error("the e820 map has {0} entries, more than the zero page holds")]
    TooManyE820(usize),
    #[error("could not write the boot parameters into guest memory: {0}")]
    Write(#[source] linux_loader::configurator::Error),
}

/// One e820 range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820 {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The memory map for `mem_size` bytes of RAM: conventional memory, the reserved EBDA (MP table),
/// RAM from 1 MiB to the MMIO gap, and RAM above 4 GiB.
pub fn e820_map(mem_size: u64) -> Result<Vec<E820>, BootParamsError> {
    if mem_size < MIN_MEMORY {
        return Err(BootParamsError::MemoryTooSmall(mem_size >> 20));
    }
    let mut map = vec![
        E820 {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820 {
            addr: EBDA_START,
            size: EBDA_END - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    let low_end = mem_size.min(MMIO_GAP_START);
    map.push(E820 {
        addr: HIMEM_START,
        size: low_end - HIMEM_START,
        kind: E820_RAM,
    });
    if mem_size > MMIO_GAP_START {
        map.push(E820 {
            addr: MMIO_GAP_END,
            size: mem_size - MMIO_GAP_START,
            kind: E820_RAM,
        });
    }
    Ok(map)
}

/// Where the initrd goes: page-aligned at the top of low memory, under the kernel's
/// `initrd_addr_max`, and above the kernel image.
pub fn initrd_address(
    mem_size: u64,
    size: u64,
    kernel_end: u64,
    initrd_addr_max: Option<u32>,
) -> Result<u64, BootParamsError> {
    let mut limit = mem_size.min(MMIO_GAP_START);
    if let Some(max) = initrd_addr_max.filter(|m| *m != 0) {
        limit = limit.min(u64::from(max) + 1);
    }
    let too_large = || BootParamsError::InitrdTooLarge {
        size,
        limit,
        kernel_end,
    };
    let addr = limit.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if addr < kernel_end.max(HIMEM_START) {
        return Err(too_large());
    }
    Ok(addr)
}

/// What the boot needs to describe.
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    pub mem_size: u64,
    /// Length of the command line including its NUL.
    pub cmdline_size: u32,
    /// (address, size)
    pub initrd: Option<(u64, u64)>,
}

/// The Linux zero page. `header` is the bzImage setup header when there is one.
pub fn zero_page(
    info: &BootInfo,
    header: Option<setup_header>,
) -> Result<boot_params, BootParamsError> {
    let mut params = boot_params::default();
    if let Some(h) = header {
        params.hdr = h;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = info.cmdline_size;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    if let Some((addr, size)) = info.initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = e820_map(info.mem_size)?;
    if map.len() > E820_MAX {
        return Err(BootParamsError::TooManyE820(map.len()));
    }
    for (i, e) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = map.len() as u8;
    Ok(params)
}

/// Writes the zero page into guest memory.
pub fn write_zero_page(mem: &GuestMemoryMmap, params: &boot_params) -> Result<(), BootParamsError> {
    let bp = BootParams::new(params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams(&bp, mem).map_err(BootParamsError::Write)
}

/// Builds and writes the PVH start info, its memory map and module list (the initrd).
pub fn write_pvh(
    mem: &GuestMemoryMmap,
    info: &BootInfo,
) -> Result<hvm_start_info, BootParamsError> {
    let map: Vec<hvm_memmap_table_entry> = e820_map(info.mem_size)?
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let mut start = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    let mut bp = BootParams::new(&start, GuestAddress(PVH_INFO_START));
    if let Some((paddr, size)) = info.initrd {
        start.nr_modules = 1;
        start.modlist_paddr = PVH_MODLIST_START;
        bp = BootParams::new(&start, GuestAddress(PVH_INFO_START));
        bp.set_modules(
            &[hvm_modlist_entry {
                paddr,
                size,
                cmdline_paddr: 0,
                reserved: 0,
            }],
            GuestAddress(PVH_MODLIST_START),
        );
    }
    bp.set_sections(&map, GuestAddress(PVH_MEMMAP_START));
    PvhBootConfigurator::write_bootparams(&bp, mem).map_err(BootParamsError::Write)?;
    Ok(start)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    const MIB: u64 = 1 << 20;

    #[test]
    fn e820_for_small_and_large_guests() {
        let m = e820_map(128 * MIB).unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(
            m[0],
            E820 {
                addr: 0,
                size: EBDA_START,
                kind: E820_RAM
            }
        );
        assert_eq!(m[1].kind, E820_RESERVED);
        assert_eq!(
            m[2],
            E820 {
                addr: HIMEM_START,
                size: 127 * MIB,
                kind: E820_RAM
            }
        );
        let big = e820_map(8 << 30).unwrap();
        assert_eq!(big.len(), 4);
        assert_eq!(big[2].addr + big[2].size, MMIO_GAP_START);
        assert_eq!(big[3].addr, MMIO_GAP_END);
        let ram: u64 = big
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (8 << 30) - (HIMEM_START - EBDA_START));
        // No range overlaps the next.
        for w in big.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr);
        }
    }

    #[test]
    fn tiny_memory_is_refused() {
        assert!(matches!(
            e820_map(8 * MIB),
            Err(BootParamsError::MemoryTooSmall(8))
        ));
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_memory() {
        let a = initrd_address(128 * MIB, 3 * MIB + 5, 20 * MIB, None).unwrap();
        assert_eq!(a % 4096, 0);
        assert!(a + 3 * MIB + 5 <= 128 * MIB);
        assert!(a >= 124 * MIB);
        // The kernel's initrd_addr_max caps it.
        let capped = initrd_address(8 << 30, MIB, 20 * MIB, Some(0x7fff_ffff)).unwrap();
        assert!(capped + MIB <= 0x8000_0000);
        // Above 4 GiB memory, still below the gap.
        let gap = initrd_address(8 << 30, MIB, 20 * MIB, None).unwrap();
        assert!(gap + MIB <= MMIO_GAP_START);
    }

    #[test]
    fn initrd_larger_than_memory_is_an_error() {
        let e = initrd_address(64 * MIB, 200 * MIB, 20 * MIB, None).unwrap_err();
        assert!(matches!(e, BootParamsError::InitrdTooLarge { .. }));
        assert!(e.to_string().contains("more memory"));
        // Fits in RAM but would overlap the kernel.
        assert!(initrd_address(64 * MIB, 50 * MIB, 20 * MIB, None).is_err());
    }

    #[test]
    fn zero_page_fields() {
        let info = BootInfo {
            mem_size: 256 * MIB,
            cmdline_size: 42,
            initrd: Some((0x0800_0000, 0x1234)),
        };
        let p = zero_page(&info, None).unwrap();
        let hdr = p.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ hdr.cmdline_size }, 42);
        assert_eq!({ hdr.ramdisk_image }, 0x0800_0000);
        assert_eq!({ hdr.ramdisk_size }, 0x1234);
        assert_eq!({ hdr.kernel_alignment }, KERNEL_MIN_ALIGNMENT_BYTES);
        assert_eq!(p.e820_entries, 3);
        let e = p.e820_table[2];
        assert_eq!(
            ({ e.addr }, { e.size }, { e.r#type }),
            (HIMEM_START, 255 * MIB, E820_RAM)
        );
    }

    #[test]
    fn zero_page_keeps_the_bzimage_header() {
        let h = setup_header {
            setup_sects: 27,
            version: 0x20f,
            kernel_alignment: 0x20_0000,
            ..Default::default()
        };
        let p = zero_page(
            &BootInfo {
                mem_size: 64 * MIB,
                cmdline_size: 1,
                initrd: None,
            },
            Some(h),
        )
        .unwrap();
        assert_eq!(({ p.hdr.setup_sects }, { p.hdr.version }), (27, 0x20f));
        assert_eq!({ p.hdr.kernel_alignment }, 0x20_0000);
        assert_eq!({ p.hdr.ramdisk_image }, 0);
    }

    #[test]
    fn zero_page_written_at_its_address() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let p = zero_page(
            &BootInfo {
                mem_size: 64 << 20,
                cmdline_size: 10,
                initrd: None,
            },
            None,
        )
        .unwrap();
        write_zero_page(&mem, &p).unwrap();
        let magic: u32 = mem.read_obj(GuestAddress(ZERO_PAGE_START + 0x202)).unwrap();
        assert_eq!(magic, KERNEL_HDR_MAGIC);
        let entries: u8 = mem.read_obj(GuestAddress(ZERO_PAGE_START + 0x1e8)).unwrap();
        assert_eq!(entries, 3);
    }

    #[test]
    fn pvh_start_info_and_module() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let info = BootInfo {
            mem_size: 64 << 20,
            cmdline_size: 10,
            initrd: Some((0x300_0000, 4096)),
        };
        let s = write_pvh(&mem, &info).unwrap();
        assert_eq!(
            (s.magic, s.nr_modules, s.memmap_entries),
            (XEN_HVM_START_MAGIC, 1, 3)
        );
        let magic: u32 = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(magic, XEN_HVM_START_MAGIC);
        let paddr: u64 = mem.read_obj(GuestAddress(PVH_MODLIST_START)).unwrap();
        assert_eq!(paddr, 0x300_0000);
        let kind: u32 = mem
            .read_obj(GuestAddress(PVH_MEMMAP_START + 24 + 16))
            .unwrap();
        assert_eq!(kind, E820_RESERVED);
    }
}
