//! Intel MultiProcessor Specification 1.4 tables, so a guest kernel without ACPI finds its
//! vCPUs, the IOAPIC and the interrupt routing. Built as bytes (little endian) rather than
//! packed structs: every field is written explicitly and checksummed.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{APIC_START, EBDA_END, EBDA_START, IOAPIC_PINS, IOAPIC_START, MAX_VCPUS};

const MPF_SIGNATURE: &[u8; 4] = b"_MP_";
const MPC_SIGNATURE: &[u8; 4] = b"PCMP";
const MP_SPEC_REV: u8 = 4;
const MPF_LEN: usize = 16;
const MPC_HEADER_LEN: usize = 44;
const CPU_ENTRY_LEN: usize = 20;
const SMALL_ENTRY_LEN: usize = 8;

const ENTRY_CPU: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_INTSRC: u8 = 3;
const ENTRY_LINTSRC: u8 = 4;

const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const IOAPIC_USABLE: u8 = 1;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// CPU signature family 6 and the FPU + APIC feature flags, as firmware reports them.
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;
const BUS_ISA: &[u8; 6] = b"ISA   ";

#[derive(Debug, Error)]
pub enum MptableError {
    #[error("{0} vCPUs requested; the MP table supports 1 to {MAX_VCPUS}")]
    TooManyCpus(u8),
    #[error("the MP table ({0} bytes) does not fit in the EBDA")]
    TooBig(usize),
    #[error("could not write the MP table into guest memory: {0}")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// The MP floating pointer followed by the configuration table, as placed at `base`.
pub fn build(base: u64, num_cpus: u8) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 || num_cpus > MAX_VCPUS {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus;
    let mut table = vec![0u8; MPC_HEADER_LEN];
    let mut count: u16 = 0;

    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        table.extend_from_slice(&[ENTRY_CPU, cpu, APIC_VERSION, flags]);
        table.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        table.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        table.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    table.extend_from_slice(&[ENTRY_BUS, 0]);
    table.extend_from_slice(BUS_ISA);
    count += 1;
    table.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_USABLE]);
    table.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    for irq in 0..IOAPIC_PINS {
        // ISA bus IRQ n → IOAPIC pin n, polarity and trigger as the bus defines (flags 0):
        // the identity routing KVM's default GSI table implements.
        table.extend_from_slice(&[ENTRY_INTSRC, INT_TYPE_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0 is the 8259's ExtINT line, LINT1 the NMI line, on every local APIC.
    table.extend_from_slice(&[ENTRY_LINTSRC, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    table.extend_from_slice(&[ENTRY_LINTSRC, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let len = u16::try_from(table.len()).map_err(|_| MptableError::TooBig(table.len()))?;
    table[0..4].copy_from_slice(MPC_SIGNATURE);
    table[4..6].copy_from_slice(&len.to_le_bytes());
    table[6] = MP_SPEC_REV;
    table[8..16].copy_from_slice(b"VMRUN   ");
    table[16..28].copy_from_slice(b"000000000000");
    table[34..36].copy_from_slice(&count.to_le_bytes());
    table[36..40].copy_from_slice(&(APIC_START as u32).to_le_bytes());
    table[7] = checksum(&table);

    let mut mpf = vec![0u8; MPF_LEN];
    mpf[0..4].copy_from_slice(MPF_SIGNATURE);
    mpf[4..8].copy_from_slice(&((base + MPF_LEN as u64) as u32).to_le_bytes());
    mpf[8] = 1; // length in 16-byte units
    mpf[9] = MP_SPEC_REV;
    mpf[10] = checksum(&mpf);

    mpf.extend_from_slice(&table);
    let total = mpf.len();
    if base + total as u64 > EBDA_END {
        return Err(MptableError::TooBig(total));
    }
    Ok(mpf)
}

/// Writes the MP table at the start of the EBDA.
pub fn setup(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MptableError> {
    let bytes = build(EBDA_START, num_cpus)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(MptableError::Write)
}

/// Expected size for `n` vCPUs (used by tests and to check the EBDA budget).
pub const fn table_len(n: usize) -> usize {
    MPF_LEN
        + MPC_HEADER_LEN
        + n * CPU_ENTRY_LEN
        + (3 + IOAPIC_PINS as usize) * SMALL_ENTRY_LEN
        + SMALL_ENTRY_LEN
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_are_valid() {
        for n in [1u8, 2, 4, MAX_VCPUS] {
            let b = build(EBDA_START, n).unwrap();
            assert_eq!(b.len(), table_len(n as usize));
            assert_eq!(&b[0..4], b"_MP_");
            assert_eq!(sum(&b[..16]), 0, "floating pointer checksum, {n} cpus");
            let len = u16::from_le_bytes([b[16 + 4], b[16 + 5]]) as usize;
            assert_eq!(&b[16..20], b"PCMP");
            assert_eq!(sum(&b[16..16 + len]), 0, "config table checksum, {n} cpus");
            let phys = u32::from_le_bytes(b[4..8].try_into().unwrap());
            assert_eq!(u64::from(phys), EBDA_START + 16);
        }
    }

    #[test]
    fn one_processor_entry_per_vcpu_and_one_bsp() {
        let n = 4u8;
        let b = build(EBDA_START, n).unwrap();
        let mut off = 16 + MPC_HEADER_LEN;
        let count = u16::from_le_bytes([b[16 + 34], b[16 + 35]]);
        let (mut cpus, mut bsp, mut ioapics, mut entries) = (vec![], 0, 0, 0);
        while off < b.len() {
            entries += 1;
            match b[off] {
                ENTRY_CPU => {
                    cpus.push(b[off + 1]);
                    assert_ne!(b[off + 3] & CPU_ENABLED, 0);
                    if b[off + 3] & CPU_BOOTPROCESSOR != 0 {
                        bsp += 1;
                    }
                    off += CPU_ENTRY_LEN;
                }
                ENTRY_IOAPIC => {
                    ioapics += 1;
                    assert_eq!(b[off + 1], n, "IOAPIC id follows the vCPUs");
                    off += SMALL_ENTRY_LEN;
                }
                _ => off += SMALL_ENTRY_LEN,
            }
        }
        assert_eq!(cpus, vec![0, 1, 2, 3]);
        assert_eq!((bsp, ioapics, entries), (1, 1, count));
    }

    #[test]
    fn bad_cpu_counts_are_refused() {
        assert!(matches!(
            build(EBDA_START, 0),
            Err(MptableError::TooManyCpus(0))
        ));
        assert!(matches!(
            build(EBDA_START, MAX_VCPUS + 1),
            Err(MptableError::TooManyCpus(n)) if n == MAX_VCPUS + 1
        ));
        assert!(matches!(
            build(EBDA_END - 32, 1),
            Err(MptableError::TooBig(_))
        ));
    }

    #[test]
    fn writes_into_guest_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        setup(&mem, 2).unwrap();
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(EBDA_START)).unwrap();
        assert_eq!(&sig, b"_MP_");
        let small = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x9f000)]).unwrap();
        assert!(matches!(setup(&small, 1), Err(MptableError::Write(_))));
    }
}
