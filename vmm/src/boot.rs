//! Putting the payload into guest memory: a Linux kernel (ELF vmlinux with or without its PVH
//! note, or a bzImage) with its initrd, command line and zero page or PVH start info; or a
//! test program. Returns where and in which CPU mode the vCPUs start.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader, PvhBootCapability};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use crate::arch::x86_64::boot_params::{self, BootInfo, BootParamsError};
use crate::arch::x86_64::gdt::CpuMode;
use crate::arch::x86_64::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, MAX_VCPUS, PROGRAM_STACK, PROGRAM_START,
};
use crate::config::BootProtocol;

#[derive(Debug, Error)]
pub enum LoadError {
    #[error("kernel image {path}: {source}; build the images with `vmrun images build` or pass --kernel")]
    KernelOpen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel image {path}: file is truncated (shorter than any kernel header)")]
    KernelTruncated { path: PathBuf },
    #[error("kernel image {path}: {source}")]
    KernelRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel image {path}: not a loadable vmlinux: {source}")]
    Elf {
        path: PathBuf,
        source: linux_loader::loader::Error,
    },
    #[error("kernel image {path}: neither an ELF vmlinux nor a bzImage ({source})")]
    BzImage {
        path: PathBuf,
        source: linux_loader::loader::Error,
    },
    #[error("kernel image {path}: has no PVH entry note; boot it with --boot-protocol linux64")]
    NoPvhNote { path: PathBuf },
    #[error("kernel command line: {len} bytes; the x86 limit is {max} (shorten --cmdline)", max = CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong { len: usize },
    #[error("kernel command line: {0}")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    #[error("kernel command line: cannot write it into guest memory: {0}")]
    CmdlineLoad(#[source] linux_loader::loader::Error),
    #[error(
        "initrd {path}: {source}; build the images with `vmrun images build` or pass --initrd"
    )]
    InitrdOpen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("initrd {path}: larger than this host can address")]
    InitrdTooLarge { path: PathBuf },
    #[error("initrd {path}: cannot load into guest memory: {source}")]
    InitrdLoad {
        path: PathBuf,
        source: GuestMemoryError,
    },
    #[error(transparent)]
    BootParams(#[from] BootParamsError),
    #[error("test program of {0} bytes does not fit below its stack")]
    ProgramTooLarge(usize),
    #[error("test program: cannot write it into guest memory: {0}")]
    ProgramLoad(#[source] GuestMemoryError),
}

/// Where the vCPUs start.
pub struct Entry {
    pub mode: CpuMode,
    pub addr: u64,
}

/// Loads a test program at [`PROGRAM_START`], below the per-vCPU stacks.
pub fn load_program(mem: &GuestMemoryMmap, code: &[u8], mode: CpuMode) -> Result<Entry, LoadError> {
    if PROGRAM_START + code.len() as u64 > PROGRAM_STACK - 0x1000 * u64::from(MAX_VCPUS) {
        return Err(LoadError::ProgramTooLarge(code.len()));
    }
    mem.write_slice(code, GuestAddress(PROGRAM_START))
        .map_err(LoadError::ProgramLoad)?;
    Ok(Entry {
        mode,
        addr: PROGRAM_START,
    })
}

/// Loads a Linux kernel, its initrd and command line, and the boot structures its entry
/// protocol needs.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    protocol: BootProtocol,
) -> Result<Entry, LoadError> {
    let path = || kernel.to_path_buf();
    let mut f = File::open(kernel).map_err(|source| LoadError::KernelOpen {
        path: path(),
        source,
    })?;
    let mut magic = [0u8; 4];
    f.read_exact(&mut magic)
        .map_err(|_| LoadError::KernelTruncated { path: path() })?;
    f.seek(SeekFrom::Start(0))
        .map_err(|source| LoadError::KernelRead {
            path: path(),
            source,
        })?;
    let himem = Some(GuestAddress(HIMEM_START));
    let is_elf = &magic == b"\x7fELF";
    let result = if is_elf {
        Elf::load(mem, None, &mut f, himem).map_err(|source| LoadError::Elf {
            path: path(),
            source,
        })?
    } else {
        BzImage::load(mem, None, &mut f, himem).map_err(|source| LoadError::BzImage {
            path: path(),
            source,
        })?
    };

    let mut cl = Cmdline::new(CMDLINE_MAX_SIZE).map_err(LoadError::Cmdline)?;
    cl.insert_str(cmdline).map_err(|e| match e {
        linux_loader::cmdline::Error::TooLarge => LoadError::CmdlineTooLong { len: cmdline.len() },
        other => LoadError::Cmdline(other),
    })?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cl).map_err(LoadError::CmdlineLoad)?;

    let header = result.setup_header;
    let initrd = match initrd {
        None => None,
        Some(ipath) => {
            let ip = || ipath.to_path_buf();
            let mut file =
                File::open(ipath).map_err(|source| LoadError::InitrdOpen { path: ip(), source })?;
            let size = file
                .metadata()
                .map_err(|source| LoadError::InitrdOpen { path: ip(), source })?
                .len();
            let max = header.map(|h| h.initrd_addr_max);
            let addr = boot_params::initrd_address(mem_size, size, result.kernel_end, max)?;
            let count =
                usize::try_from(size).map_err(|_| LoadError::InitrdTooLarge { path: ip() })?;
            mem.read_exact_volatile_from(GuestAddress(addr), &mut file, count)
                .map_err(|source| LoadError::InitrdLoad { path: ip(), source })?;
            Some((addr, size))
        }
    };

    let info = BootInfo {
        mem_size,
        cmdline_size: cmdline.len() as u32 + 1,
        initrd,
    };
    let pvh = match (result.pvh_boot_cap, protocol) {
        (PvhBootCapability::PvhEntryPresent(addr), BootProtocol::Auto | BootProtocol::Pvh) => {
            Some(addr.0)
        }
        (_, BootProtocol::Pvh) => return Err(LoadError::NoPvhNote { path: path() }),
        _ => None,
    };
    if let Some(addr) = pvh {
        boot_params::write_pvh(mem, &info)?;
        return Ok(Entry {
            mode: CpuMode::Protected32,
            addr,
        });
    }
    let params = boot_params::zero_page(&info, header)?;
    boot_params::write_zero_page(mem, &params)?;
    // bzImage: the 64-bit entry sits 0x200 past the protected-mode code.
    let addr = if is_elf {
        result.kernel_load.0
    } else {
        result.kernel_load.0 + 0x200
    };
    Ok(Entry {
        mode: CpuMode::Long64,
        addr,
    })
}
